"""A convolutional stem for small ViTs: the patch embedding of tiny-synth.

Early convolutions in place of the patchify layer make a ViT train faster and more stably
(Xiao et al., "Early Convolutions Help Transformers See Better", NeurIPS 2021). Here: 3 x 3
stride-2 convolutions with GELU, then a 1 x 1 convolution to the transformer's width; three
of them give the grid of 8 px patches. It replaces ``visual.conv1`` of an open_clip
``VisionTransformer`` or ``patch_embed.proj`` of a timm one (``ConvStemEmbed``); everything after
the patch embedding (CLS and register tokens, positions, blocks, pooling) is the ViT's own, so
every method reads the model as any other ViT of its library.
"""

from __future__ import annotations

from timm.layers import PatchEmbed
from torch import Tensor, nn

STEM_CHANNELS = (32, 64, 128)


class ConvStem(nn.Sequential):
    """``[B, 3, H, W]`` to ``[B, width, H // 2^k, W // 2^k]`` with k = len(channels); ``mixing``
    further 3 x 3 stride-1 convolutions (with GELU) at the last resolution widen what each token
    sees before the 1 x 1 convolution (a hybrid ViT's convolutional trunk, in miniature)."""

    def __init__(self, width: int, channels: tuple[int, ...] = STEM_CHANNELS, mixing: int = 0):
        layers: list[nn.Module] = []
        previous = 3
        for count in channels:
            layers += [nn.Conv2d(previous, count, 3, stride=2, padding=1), nn.GELU()]
            previous = count
        layers += [ResidualConv(previous) for _ in range(mixing)]
        layers.append(nn.Conv2d(previous, width, 1))
        super().__init__(*layers)
        self.stride = 2 ** len(channels)

    def forward(self, images: Tensor) -> Tensor:
        """The stem over the image cropped to a multiple of the stride (the grid a patchify
        convolution of that size gives: ``floor(H / stride)``, remainder pixels dropped)."""
        rows, cols = (side // self.stride * self.stride for side in images.shape[-2:])
        return super().forward(images[..., :rows, :cols])


class ResidualConv(nn.Module):
    """``x + conv(gelu(x))``: a 3 x 3 stride-1 convolution on a residual stream (a stack of
    plain ones without normalisation stalls in training)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """The residual update."""
        return x + self.conv(nn.functional.gelu(x))


class ConvStemEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` with a ``ConvStem`` as its projection (``patch_size`` must be the
    stem's stride)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.proj = ConvStem(self.proj.out_channels)
        if self.proj.stride != self.patch_size[0] or self.proj.stride != self.patch_size[1]:
            raise ValueError(f"a ConvStem has stride {self.proj.stride}, not {self.patch_size}")
