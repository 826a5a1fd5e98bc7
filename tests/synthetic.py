"""Small synthetic scenes for tests: flat regions, rectangles and discs of several classes,
each class with its own colour and texture, so that boundaries are real and learnable."""
import torch


def scenes(n: int, size: int = 128, classes: int = 5, seed: int = 0):
    """(images (n, 3, size, size) normalised, labels (n, size, size) in [0, classes))."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(5):
            cls = int(torch.randint(1, classes, (1,), generator=g))
            cy, cx = torch.randint(0, size, (2,), generator=g).tolist()
            r = int(torch.randint(8, size // 3, (1,), generator=g))
            if torch.rand(1, generator=g) < 0.5:
                region = ((yy - cy).abs() < r) & ((xx - cx).abs() < r * 3 // 4)
            else:
                region = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            labels[i][region] = cls
    palette = torch.rand(classes, 3, generator=g) * 2 - 1
    freq = torch.rand(classes, generator=g) * 0.5 + 0.1
    texture = torch.sin(xx[None] * freq[labels] + yy[None] * freq[labels].flip(0))
    images = palette[labels].permute(0, 3, 1, 2) + 0.3 * texture[:, None]
    images = images + 0.1 * torch.randn(n, 3, size, size, generator=g)
    return images, labels
