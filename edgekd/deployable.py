"""The deployable network: the trained model with its input normalization inside.

Every exported model takes RGB pixels scaled to [0, 1] (what a camera frame divided by 255 is),
so an app only resizes and divides by 255. The training normalization (per-channel mean/std)
and, for grayscale models, the RGB-to-luma conversion are folded into the first convolution's
weights: no extra operators, and MediaPipe's single mean/std metadata can describe the input.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd.data import to_unit
from edgekd.errors import EdgeKDError
from edgekd.zoo import fit_input


class Deployable(nn.Module):
    """The trained network with its input normalization in front: [0, 1] pixels in, logits out."""

    def __init__(self, model: nn.Module, mean, std) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) * self.inv_std)


# ITU-R 601-2 luma, Pillow's RGB -> L conversion: how grayscale training images were made from RGB.
LUMA = (0.299, 0.587, 0.114)


class FoldedConv(nn.Module):
    """A convolution that absorbed the input normalization, plus a constant border map.

    With zero padding, padded taps of the original convolution saw the normalized value 0, i.e.
    the raw pixel ``mean``; after folding they see raw 0. The difference does not depend on the
    input, so one constant (1, C_out, H_out, W_out) tensor added after the convolution makes the
    folded layer exact, at the cost of fixing the input size (which deployed models have anyway).
    Without padding, or with a zero mean, there is nothing to correct and no constant is added.
    """

    def __init__(self, conv: nn.Conv2d, border: torch.Tensor | None) -> None:
        super().__init__()
        self.conv = conv
        self.has_border = border is not None  # a Python bool: traced as a constant, not a tensor test
        self.register_buffer("border", border if border is not None else torch.zeros(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + self.border if self.has_border else y


def fold_input_normalization(model: nn.Module, mean, std, channels: int, size: tuple[int, int],
                             fuse_bn: bool = True) -> nn.Module:
    """A copy of ``model`` taking RGB [0, 1] pixels, with ``(x - mean) / std`` (and, for 1-channel
    models, the RGB-to-luma conversion) folded into its first convolution; with ``fuse_bn``, the batch
    norm that alone reads that convolution folded into it too.

    We write this ourselves: converters fold normalization only when it is a separate op in the
    graph, which is exactly what MediaPipe's one-mean/one-std metadata cannot describe per channel.
    """
    model = copy.deepcopy(model).eval()
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels != channels or conv.groups != 1 or conv.padding_mode != "zeros":
        raise EdgeKDError("the model does not start with a plain convolution; normalization cannot be folded")
    if fuse_bn:
        conv = _fuse_following_batchnorm(model, name)
    w = conv.weight.detach()  # (O, C, kh, kw)
    b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0])
    mean_t, std_t = torch.tensor(mean, dtype=w.dtype), torch.tensor(std, dtype=w.dtype)
    w_raw = w / std_t.view(1, -1, 1, 1)
    b_raw = b - (w * (mean_t / std_t).view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    border = border_map(conv, mean_t / std_t, size)
    if channels == 1:
        w_raw = w_raw * torch.tensor(LUMA, dtype=w.dtype).view(1, 3, 1, 1)  # (O, 1, k, k) -> (O, 3, k, k)
    new = nn.Conv2d(3, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=True)
    with torch.no_grad():
        new.weight.copy_(w_raw)
        new.bias.copy_(b_raw)
    model.set_submodule(name, FoldedConv(new, border))
    return model


def _fuse_following_batchnorm(model: nn.Module, conv_name: str) -> nn.Conv2d:
    """Folds the BatchNorm2d that alone reads the convolution ``conv_name`` into it (in place, eval
    statistics) and returns the convolution now in ``model``.

    Runtimes fuse Conv -> BatchNorm themselves, but the border constant ``FoldedConv`` adds sits
    between the two, so without this the stem's batch norm stays a separate float operator at the
    largest feature map, in fp32 files and as a float island inside int8 ones
    (benchmarks/results/stem_bn.md). The graph comes from torch.fx; a model it cannot trace, or
    whose convolution output has other readers, keeps its batch norm (still exact, only slower).
    """
    import torch.fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv = model.get_submodule(conv_name)
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - untraceable Python in forward(): keep the model as it is
        return conv
    calls = [n for n in graph.nodes if n.op == "call_module"]
    conv_calls = [n for n in calls if n.target == conv_name]
    if len(conv_calls) != 1 or len(conv_calls[0].users) != 1:
        return conv
    (reader,) = conv_calls[0].users
    bn = model.get_submodule(reader.target) if reader.op == "call_module" else None
    # only a plain BatchNorm2d (a subclass may do more: timm's BatchNormAct2d), called once, without hooks
    if (type(bn) is not nn.BatchNorm2d or bn.running_mean is None or bn._forward_hooks or bn._forward_pre_hooks
            or sum(n.target == reader.target for n in calls) != 1
            or any(n.op == "get_attr" and n.target.startswith(reader.target + ".") for n in graph.nodes)):
        return conv  # read elsewhere (its weights, a hook): it stays; deploy_net's check covers what FX cannot see
    fused = fuse_conv_bn_eval(conv, bn)
    model.set_submodule(conv_name, fused)
    model.set_submodule(reader.target, nn.Identity())
    return fused


def border_map(conv: nn.Conv2d, shift: torch.Tensor, size: tuple[int, int]) -> torch.Tensor | None:
    """What the zero-padded taps of ``conv`` add once ``shift`` (= mean / std, per input channel) is
    folded into its bias: (1, C_out, H_out, W_out), exactly zero where a tap window lies inside the
    image. None when nothing is padded or every entry is zero (e.g. a zero mean): no constant at all.
    """
    if conv.padding == "valid" or (not isinstance(conv.padding, str) and not any(conv.padding)):
        return None
    with torch.no_grad():
        weight = conv.weight.detach()
        shifted = shift.view(1, -1, 1, 1).expand(1, conv.in_channels, *size)
        all_taps = (weight * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
        inside = F.conv2d(shifted, weight, None, conv.stride, conv.padding, conv.dilation)
        taps = F.conv2d(torch.ones(1, 1, *size), torch.ones(1, 1, *conv.kernel_size), None, conv.stride,
                        conv.padding, conv.dilation)  # in-image taps per output position (exact small integers)
        full = conv.kernel_size[0] * conv.kernel_size[1]
        border = (all_taps - inside) * (taps < full).to(weight.dtype)
    return border if bool(border.abs().max() > 0) else None


class RGBInput(nn.Module):
    """Fallback when folding is impossible: RGB [0, 1] in, luma for 1-channel models, then ``Deployable``."""

    def __init__(self, net: Deployable, channels: int) -> None:
        super().__init__()
        self.net, self.channels = net, channels
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels == 1:
            x = (x * self.luma).sum(dim=1, keepdim=True)
        return self.net(x)


def deploy_net(model: nn.Module, meta: dict) -> tuple[nn.Module, str]:
    """The network every exported file holds, and how its input normalization is done.

    Folding is verified against ``Deployable`` on random pixels; a model it does not fit keeps the
    normalization as graph operators instead.
    """
    channels, size = int(meta["in_channels"]), tuple(meta["input_size"])
    reference = Deployable(model, meta["mean"], meta["std"]).eval()
    x = torch.rand(4, channels, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(x)
        for fuse_bn in (True, False):  # without the stem batch norm's fold where it broke the network
            try:
                folded = fold_input_normalization(model, meta["mean"], meta["std"], channels, size, fuse_bn)
                got = folded(rgb(x))
            except EdgeKDError:
                break
            except Exception:  # noqa: BLE001 - a module read outside its call (what torch.fx cannot see)
                if not fuse_bn:
                    raise  # the plain fold has no such excuse: a bug, not a model it does not fit
                continue
            if (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max())):
                return folded, "folded into the first convolution"
    return RGBInput(reference, channels).eval(), "operators at the start of the graph"


def rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) gray -> (B, 3, H, W) with R = G = B; RGB batches unchanged."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def model_input(meta: dict, x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 images to the deployable model's input: [0, 1], the model's channels and size, NCHW."""
    return app_pixels(x_u8, int(meta["in_channels"]), tuple(meta["input_size"]))


def app_pixels(x_u8: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 images as an app hands them to a model of ``channels`` and ``size``: [0, 1], NCHW. An app
    resizes 8-bit frames, so resized pixels are rounded back to 8 bits (an int8 model can flip an
    image on a smaller difference); bench, quantize and package's checks all see these pixels."""
    x = fit_input(to_unit(x_u8), channels, size)
    if tuple(x.shape[-2:]) != tuple(x_u8.shape[-2:]):
        x = torch.round(x * 255.0) / 255.0
    return x


def preprocessing(meta: dict, layout: str) -> dict:
    """What an app must do to an image before this file sees it (recorded beside every file)."""
    h, w = meta["input_size"]
    c = int(meta["in_channels"])
    shape = [1, 3, h, w] if layout == "NCHW" else [1, h, w, 3]
    note = {"grayscale_model": "trained on 1-channel images; RGB is converted to luma (ITU-R 601) inside"} if c == 1 else {}
    return {"layout": layout, "shape": shape, "resize": [h, w], "channel_order": "RGB",
            "scale": "divide 0-255 pixels by 255 (input range [0, 1])",
            "normalization_inside_model": {"mean": meta["mean"], "std": meta["std"],
                                           "how": meta.get("normalization", "operators at the start of the graph")},
            **note,
            "classes": meta["classes"], "output": "logits"}
