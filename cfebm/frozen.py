"""A frozen, fused copy of one stage's energy, for Langevin sampling.

During a chain the weights do not change, so everything that depends only on them is
computed once here instead of on every step (docs/performance.md):

* spectral norm and equalised-lr scaling are applied once (no power iteration);
* the linear 1x1 ``from_image`` conv followed by the block's first 3x3 conv is one 3x3
  conv on the raw image channels, plus a constant map from the 1x1 bias (which the zero
  padding of the 3x3 conv sees only inside the image: a border term);
* the residual 1x1 conv commutes with average pooling, so it runs at a quarter of the
  positions, and composes with ``from_image`` into one 1x1 conv;
* a 3x3 conv followed by 2x2 average pooling is one 4x4 stride-2 conv.

Nothing here requires parameter gradients or keeps a graph beyond one energy call, and no
DDP wrapper is involved, so no gradient hooks fire during sampling. The function is the
same as :meth:`EnergyNet.forward` in eval mode (up to float rounding); tests and
``make bench`` check that. The energies of finished stages never change, so a trainer
builds theirs once per stage (:func:`stage_energies`) and only the current one per step.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from .layers import EqConv2d, Swish
from .model import Block, CoarseToFineEBM, EnergyNet, _res_key

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
log = logging.getLogger(__name__)


def _conv_pool_kernel(w: torch.Tensor) -> torch.Tensor:
    """3x3 kernel [O, I, 3, 3] -> 4x4 kernel of conv3x3 (pad 1) followed by avgpool 2x2.

    conv(x, W4, stride=2, padding=1)[i, j] = mean over the 2x2 window of conv(x, W, pad=1).
    """
    o, i, _, _ = w.shape
    w4 = w.new_zeros(o, i, 4, 4)
    for da in (0, 1):
        for db in (0, 1):
            w4[:, :, da : da + 3, db : db + 3] += w
    return w4 * 0.25


def _fold_input_conv(
    w: torch.Tensor, b: torch.Tensor | None, input_conv: EqConv2d, resolution: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3x3 conv (w, b) reading the output of the linear 1x1 ``input_conv`` -> one 3x3
    conv on the raw image channels plus a constant map [1, O, r, r].

    conv3x3(Wi x + bi) = (W * Wi) x + conv3x3(bi), where the zero padding sees the bias
    map only inside the image: the constant differs at the border.
    """
    wi, bi = _weights(input_conv)  # [C, C_img, 1, 1], [C]
    bias_map = bi.view(1, -1, 1, 1).expand(1, -1, resolution, resolution)
    border = F.conv2d(bias_map, w, b, padding=1)  # [1, O, r, r]
    return torch.einsum("ockl,ci->oikl", w, wi[:, :, 0, 0]), border


def _conv3x3(h, w, b, border):
    y = F.conv2d(h, w, b, padding=1)
    return y if border is None else y + border


def _weights(conv: EqConv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = conv.effective_weight(update=False).detach()
    b = None if conv.bias is None else conv.bias.detach()
    return w, b


class _FusedBlock:
    """A :class:`Block` with conv2+pool as one strided conv and pool-then-1x1 skip.

    If ``input_conv`` is given, the block reads raw images and that linear 1x1 conv is
    folded into conv1 and the skip.
    """

    def __init__(
        self,
        block: Block,
        act: _Act,
        input_conv: EqConv2d | None,
        resolution: int,
        dtype: torch.dtype,
        channels_last: bool,
    ):
        w1, b1 = _weights(block.conv1)  # [C, C, 3, 3]
        w2, b2 = _weights(block.conv2)  # [O, C, 3, 3]
        ws, bs = _weights(block.skip)  # [O, C, 1, 1], [O] or None
        self.border = None
        self.skip_bias = bs
        if input_conv is not None:
            w1, border = _fold_input_conv(w1, b1, input_conv, resolution)
            self.border, b1 = border.to(dtype), None
            # the skip 1x1 conv composes with the input 1x1 conv into one 1x1 conv
            wi, bi = _weights(input_conv)
            folded = ws[:, :, 0, 0] @ bi  # [O]
            self.skip_bias = folded if bs is None else folded + bs
            ws = torch.einsum("oc,ci->oi", ws[:, :, 0, 0], wi[:, :, 0, 0])[:, :, None, None]
        # The activation's output scale folds into the next linear map: conv2 here, and
        # the 1/sqrt(2) of the residual sum folds into the skip conv.
        self.w1 = _prep(w1, dtype, channels_last)
        self.b1 = None if b1 is None else b1.to(dtype)
        self.w2 = _prep(_conv_pool_kernel(w2) * act.scale, dtype, channels_last)
        self.b2 = b2.to(dtype)
        self.ws = _prep(ws * _INV_SQRT2, dtype, channels_last)
        if self.skip_bias is not None:
            self.skip_bias = (self.skip_bias * _INV_SQRT2).to(dtype)
        self.out_scale = act.scale * _INV_SQRT2
        self.act = act.fn

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        y = self.act(_conv3x3(h, self.w1, self.b1, self.border))
        y = self.act(F.conv2d(y, self.w2, self.b2, stride=2, padding=1))
        s = F.conv2d(F.avg_pool2d(h, 2), self.ws, self.skip_bias)
        return torch.add(s, y, alpha=self.out_scale)


class _FusedHead:
    def __init__(
        self,
        net: EnergyNet,
        act: _Act,
        input_conv: EqConv2d | None,
        dtype: torch.dtype,
        channels_last: bool,
    ):
        head = net.head
        w1, b1 = _weights(head.conv1)
        self.border = None
        if input_conv is not None:  # stage 0 at 4x4: from_image feeds the head directly
            w1, border = _fold_input_conv(w1, b1, input_conv, 4)
            self.border, b1 = border.to(dtype), None
        self.w1 = _prep(w1, dtype, channels_last)
        self.b1 = None if b1 is None else b1.to(dtype)
        w2, b2 = _weights(head.conv2)
        self.w2, self.b2 = _prep(w2 * act.scale, dtype, channels_last), b2.to(dtype)
        wl, bl = head.linear.effective_weight(update=False).detach(), head.linear.bias.detach()
        self.wl, self.bl = (wl * act.scale).to(dtype), bl.to(dtype)
        self.act = act.fn

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        h = self.act(_conv3x3(h, self.w1, self.b1, self.border))
        h = self.act(F.conv2d(h, self.w2, self.b2))
        return F.linear(h.flatten(1), self.wl, self.bl).squeeze(1)


class _Act:
    """The activation as fn(x) * scale; Swish's 1/1.1 becomes a weight scale."""

    def __init__(self, module: torch.nn.Module):
        if isinstance(module, Swish):
            self.fn, self.scale = F.silu, 1.0 / 1.1
        else:
            self.fn, self.scale = module, 1.0


def _prep(w: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    w = w.to(dtype)
    return w.contiguous(memory_format=torch.channels_last) if channels_last else w


class FrozenEnergy:
    """E_t(x) of one stage's network ``net`` (with fade ``beta``), weights fixed at creation.

    Call it on x [B, C, r_t, r_t]; it returns energies [B] in float32 whatever ``dtype``
    it computes in (``torch.bfloat16`` runs the convs in reduced precision).
    ``channels_last`` (NHWC activations) makes the oneDNN convs faster on CPU.
    """

    def __init__(
        self,
        net: EnergyNet,
        beta: float = 1.0,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
        compile: str | None = None,
    ):
        t = net.stage
        self.stage, self.dtype, self.channels_last = t, dtype, channels_last
        self.compile = compile
        self.resolution = r = net.resolution
        self.beta = 1.0 if t == 0 else float(beta)
        act = _Act(net.head.act)
        cl = channels_last
        with torch.no_grad():
            fi = net.from_image[_res_key(r)]
            self.fade = None
            if r == 4:  # stage 0 at 4x4: no block, from_image folds into the head
                self.first = None
                self.trunk = []
                self.head = _FusedHead(net, act, fi, dtype, cl)
                return
            self.first = _FusedBlock(net.blocks[_res_key(r)], act, fi, r, dtype, cl)
            if t > 0 and self.beta < 1.0:
                wf, bf = _weights(net.from_image[_res_key(r // 2)])
                # beta as a tensor: compiled code reads it as an input, not a constant
                mix = torch.tensor(self.beta, dtype=dtype, device=wf.device)
                self.fade = (_prep(wf, dtype, cl), bf.to(dtype), mix)
            rr, self.trunk = r // 2, []
            while rr > 4:
                blk = net.blocks[_res_key(rr)]
                self.trunk.append(_FusedBlock(blk, act, None, rr, dtype, cl))
                rr //= 2
            self.head = _FusedHead(net, act, None, dtype, cl)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compile is None:
            return _energy(self, x)
        fn = _compiled(self.compile)
        if fn is not _energy and (self.compile, self.dtype, tuple(x.shape)) not in _VERIFIED:
            fn = verify_compiled(self, x, fn)
        return _run(fn, self, x)


def _run(fn, f: FrozenEnergy, x: torch.Tensor) -> torch.Tensor:
    """``fn(f, x)``; CUDA graphs (reduce-overhead) need a new step and output buffers."""
    if fn is _energy or f.compile != "reduce-overhead":
        return fn(f, x)
    torch.compiler.cudagraph_mark_step_begin()
    return fn(f, x).clone()


def _energy(f: FrozenEnergy, x: torch.Tensor) -> torch.Tensor:
    x = x.to(f.dtype)
    if f.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if f.first is None:
        return f.head(x).float()
    h = f.first(x)
    if f.fade is not None:
        w, b, beta = f.fade
        h = torch.lerp(F.conv2d(F.avg_pool2d(x, 2), w, b), h, beta)  # beta h + (1 - beta) fade
    for block in f.trunk:
        h = block(h)
    return f.head(h).float()


_COMPILED: dict[str, object] = {}
_VERIFIED: set[tuple] = set()


def verify_compiled(f: FrozenEnergy, x: torch.Tensor, fn) -> object:
    """Check the compiled energy ``fn`` against the eager one on its first input of each
    shape; returns ``fn``, or the eager function (with a warning, from then on for this
    compile mode) where they differ beyond float rounding. Generated code can be wrong
    on some machines: inductor on an AVX-512 CPU with ``ATEN_CPU_CAPABILITY=avx2``
    returned energies of 1e33 where the eager ones are below 1."""
    with torch.enable_grad():  # the chain differentiates the energy: check the gradient too
        xe = x.detach().clone().requires_grad_(True)
        xc = x.detach().clone().requires_grad_(True)
        eager = _energy(f, xe)
        (g_eager,) = torch.autograd.grad(eager.sum(), xe)
        out = _run(fn, f, xc)
        (g_out,) = torch.autograd.grad(out.sum(), xc)
    tol = 1e-3 if f.dtype == torch.float32 else 5e-2
    pairs = [(a.detach().float(), b.detach().float()) for a, b in ((eager, out), (g_eager, g_out))]
    if not all(b.isfinite().all() and torch.allclose(b, a, rtol=tol, atol=tol) for a, b in pairs):
        e_diff, g_diff = ((b - a).abs().max().item() for a, b in pairs)
        log.warning(
            "torch.compile (mode %s) computes a different energy on this machine (largest "
            "difference %.3g in the energy, %.3g in its gradient); sampling with the eager "
            "energy instead",
            f.compile,
            e_diff,
            g_diff,
        )
        _COMPILED[f.compile] = _energy
        return _energy
    _VERIFIED.add((f.compile, f.dtype, tuple(x.shape)))
    return fn


def _compiled(mode: str):
    """One compiled energy function per torch.compile mode, shared by every FrozenEnergy:
    the weights are its inputs, not constants, so a stage's energy rebuilt with new weights
    (every training step) or another fade coefficient runs the same compiled code."""
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_energy, mode=None if mode == "default" else mode)
    return _COMPILED[mode]


def stage_energies(
    model: CoarseToFineEBM,
    stage: int | None = None,
    beta: float = 1.0,
    dtype: torch.dtype = torch.float32,
    first_stage: int = 0,
    compile: str | None = None,
) -> list[FrozenEnergy]:
    """Frozen energies E_first, ..., E_s (each stage's own network) for a coarse-to-fine
    chain; the last one, if it is the model's current stage, at fade ``beta``."""
    s = model.stage if stage is None else stage
    if not 0 <= first_stage <= s <= model.stage:
        raise ValueError(f"stages {first_stage}..{s} not in the model's 0..{model.stage}")
    return [
        FrozenEnergy(model.nets[t], beta if t == model.stage else 1.0, dtype, compile=compile)
        for t in range(first_stage, s + 1)
    ]
