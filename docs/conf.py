"""Sphinx configuration of pixcontrast's documentation site.

Build it (what .ci/run does; -W and -n make every warning and every unresolved reference fail)::

    bash scripts/env.sh python -m sphinx -W -n --keep-going -q -b html docs build/docs

The guides are Markdown (MyST); the API pages (api/*.rst: reStructuredText, because autodoc
writes reST) render the package's docstrings with autodoc and napoleon (Google style), whose reST
roles (:class:, :func:, :math:) become checked references and math. Nothing is downloaded
while building.
"""

import importlib
import re
from types import ModuleType

import pixcontrast

project = "pixcontrast"
author = "The pixcontrast authors"
copyright = "2026, The pixcontrast authors"
release = pixcontrast.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# The API pages document each public name where a user imports it (pixcontrast.X), in the order
# of its source, with the signature as written.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# "Attributes:" sections as fields of their class, so that a NamedTuple's fields, which autodoc
# documents as members too, are not described twice
napoleon_use_ivar = True

# Names outside pixcontrast have no inventory here (fetching torch's or Python's would need the
# network): references to them are written out, not linked.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|np|triton|typing|typing_extensions|collections|abc|enum|types)\b.*"),
    (r"py:.*", r"(Tensor|Module|Parameter|Generator|dtype|device|Size|Any|Callable|Optional|Union"
               r"|Sequence|Mapping|Iterable|Iterator|Literal|Protocol|NamedTuple|ClassVar|Self"
               r"|Path|int|float|bool|str|bytes|tuple|list|dict|set|object|None|Ellipsis)"),
]

html_theme = "furo"
html_title = f"pixcontrast {release}"
html_static_path: list[str] = []


# Docstrings name objects where they are defined (``pixcontrast.mining.mine_keys``, or
# ``select_anchors`` inside pixcontrast.samplers) while the API pages document each one once, where
# a user imports it (``pixcontrast.mine_keys``). A reference that Sphinx cannot find is looked up
# by the object it names: the documented entry of the same object, or, for an object of torch (an
# inherited ``load_state_dict``) or a private one (a type a signature passes through), the name
# as text without a link. Anything else stays unresolved, and -n fails the build.
_MISSING = object()


def _lookup(path: str) -> object:
    """The object at a dotted path, importing its longest importable module prefix."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            value = getattr(value, attribute, _MISSING)
        return value
    return _MISSING


def _shown_as_text(path: str, value: object) -> bool:
    """A private name, or an object that pixcontrast does not define."""
    private = any(part.startswith("_") and not part.startswith("__") for part in path.split("."))
    home = getattr(value, "__module__", None) or ""
    return private or not (isinstance(value, ModuleType) or home.startswith("pixcontrast"))


def _resolve_by_object(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    domain = env.get_domain("py")
    target = node["reftarget"]
    module, cls = node.get("py:module"), node.get("py:class")
    scopes = [""]
    if module:
        scopes += [f"{module}.{cls}" if cls else module, module]
        defined_in = getattr(_lookup(f"{module}.{cls}"), "__module__", None) if cls else None
        if defined_in:
            scopes.append(defined_in)
    # the module that defines the object whose docstring holds the reference
    docstring_of = re.search(r"docstring of ([\w.]+)", getattr(node, "source", None) or "")
    if docstring_of:
        owner = docstring_of.group(1)
        while owner and not isinstance(_lookup(owner), ModuleType):
            owner = owner.rpartition(".")[0]
        if owner:
            scopes.append(owner)
    for scope in scopes:
        path = f"{scope}.{target}" if scope else target
        value = _lookup(path)
        if value is _MISSING:
            continue
        if _shown_as_text(path, value):
            return contnode
        documented = [path] if path in domain.objects else [
            name for name, entry in domain.objects.items()
            if entry.objtype != "module" and not isinstance(value, (bool, int, float, str))
            and _lookup(name) is value
        ]
        if documented:
            return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                       documented[0], node, contnode)
    return None


def setup(app):
    app.connect("missing-reference", _resolve_by_object)
