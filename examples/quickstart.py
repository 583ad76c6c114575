"""The shortest complete use of pixcontrast: pixel embeddings and labels to ``loss.backward()``."""

import torch

import pixcontrast

torch.manual_seed(0)
features = torch.randn(2, 64, 32, 32, requires_grad=True)  # backbone output [B, C, h, w]
labels = torch.randint(0, 19, (2, 128, 128))  # ground truth [B, H, W]; 255 = ignored
labels[:, :8] = 255

head = pixcontrast.ProjectionHead(in_channels=64, proj_dim=128)  # -> unit vectors [B, 128, h, w]
criterion = pixcontrast.PixelContrastLoss(temperature=0.1, ignore_index=255)

loss = criterion(head(features), labels)  # labels are nearest-resized to 32 x 32
loss.backward()
print(f"loss {loss.item():.4f}; gradient norm on the features {features.grad.norm():.4f}")
