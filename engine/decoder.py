"""A lean forward of Llama-family decoder layers over slot KV buffers: static shapes, per-row positions.

The LLM (Llama, Qwen2, Qwen3, Mistral), CSM's backbone and CSM's depth decoder are all stacks of the
same pre-norm layer: RMSNorm, attention with RoPE and grouped K/V heads, RMSNorm, gated MLP. This
module reads the weights of a transformers model once (q/k/v and gate/up fused into one matrix
each; the model's own parameters become views of the fused ones, so no memory is duplicated and the
transformers model stays usable as a reference) and runs the layers itself:

- K/V live in a :class:`SlotKV`: one buffer per layer, ``[slots + 1, 2, H_kv, positions + 1, D]``
  (keys and values side by side), allocated once. Row ``r`` is one session's cache, position ``p`` holds the key written at RoPE
  position ``p``. The extra row and column are scratch: rows that take part in a batched step
  without a token of their own write there, so a step can cover a fixed range of rows.
- :meth:`LeanDecoder.forward` takes per-row positions ``[B, T]`` and a boolean mask ``[B, T, L]`` of
  the keys each query may see: a decode step for rows ``0..b-1`` and a prefill of one row are the
  same call with other shapes, and a decode step of ``b`` rows always has the same shapes (so it can
  be captured in a CUDA graph).

The numbers are those of the transformers modules (tests compare logits with the models' own
forward); nothing here depends on how a transformers version names its cache argument.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from duplex.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass
class LayerWeights:
    norm1: torch.Tensor
    eps1: float
    qkv: torch.Tensor  # [(H + 2 * H_kv) * D, hidden]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm over each head's D dims, before RoPE
    k_norm: torch.Tensor | None
    qk_eps: float
    out: torch.Tensor
    out_bias: torch.Tensor | None
    norm2: torch.Tensor
    eps2: float
    gate_up: torch.Tensor  # [2 * I, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    # True: ``qkv`` (and its bias) already holds the RoPE rotation of one fixed position
    # (:meth:`LeanDecoder.at_position`), so its queries and keys come out rotated and no RoPE runs
    rotated: bool = False


@dataclass
class SlotKV:
    """K/V buffers of every layer, allocated once: one ``[slots + 1, 2, H_kv, columns, D]`` buffer per
    layer, its keys at ``[:, 0]`` and its values at ``[:, 1]`` (:attr:`keys` and :attr:`values` are
    those views, ``[slots + 1, H_kv, columns, D]`` each).

    Keys and values share a buffer so that a step writes a token's key and value with one kernel
    (they leave the qkv product side by side) and a decode step gathers its rows' keys and values
    with one. ``columns`` is ``positions + 1`` (the last is the scratch position) rounded up to a
    multiple of 8, so an attention over all of them has rows aligned for fused attention kernels; the
    columns after the scratch one are never written and every mask hides them."""

    layers: list[torch.Tensor]
    positions: int = -1  # -1: every column but the last (no padding)
    keys: list[torch.Tensor] = field(init=False)
    values: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        if any(t.ndim != 5 or t.shape[1] != 2 for t in self.layers):
            raise ValueError("each layer's K/V buffer is [slots + 1, 2, H_kv, columns, D]")
        self.keys = [t[:, 0] for t in self.layers]
        self.values = [t[:, 1] for t in self.layers]
        if self.positions < 0:
            self.positions = self.columns - 1

    @property
    def slots(self) -> int:
        return self.layers[0].shape[0] - 1

    @property
    def columns(self) -> int:
        """Positions an attention may read: ``positions + 1``, padded."""
        return self.layers[0].shape[3]

    @property
    def scratch_row(self) -> int:
        return self.slots

    @property
    def scratch_position(self) -> int:
        return self.positions

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.layers)

    def slot_nbytes(self) -> int:
        """Bytes one row holds (every layer's keys and values)."""
        return sum(t[0].numel() * t.element_size() for t in self.layers)

    def keep(self, row: int, n: int) -> list[torch.Tensor]:
        """Copies of positions ``[0, n)`` of row ``row``, every layer's keys and values ``[2, H_kv, n, D]``:
        a prefix that :meth:`restore` puts at the start of any row (K/V at a position do not depend on
        the row)."""
        return [t[row, :, :, :n].clone() for t in self.layers]

    def restore(self, row: int, prefix: list[torch.Tensor]) -> int:
        """Write a :meth:`keep` prefix at the start of row ``row``; returns its length."""
        n = prefix[0].shape[2]
        for kept, t in zip(prefix, self.layers):
            t[row, :, :, :n] = kept
        return n

    def swap_rows(self, a: int, length_a: int, b: int, length_b: int) -> None:
        """Exchange the first ``length_a`` positions of row ``a`` and the first ``length_b`` of row
        ``b`` (what each holds; the positions after them are never read before they are written)."""
        for t in self.layers:
            kept = t[a, :, :, :length_a].clone()
            t[a, :, :, :length_b] = t[b, :, :, :length_b]
            t[b, :, :, :length_a] = kept

    def copy_positions(self, src: int, dst: int, start: int, end: int) -> None:
        """Copy positions ``[start, end)`` of row ``src`` to row ``dst``."""
        for t in self.layers:
            t[dst, :, :, start:end] = t[src, :, :, start:end]


def padded_columns(positions: int) -> int:
    """``positions + 1`` (the scratch position) rounded up to a multiple of 8."""
    return -(-(positions + 1) // 8) * 8


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm, ``weight * x * rsqrt(mean(x^2) + eps)``, through torch's own
    (``aten::_fused_rms_norm``): on a GPU one fused kernel (torch 2.8 on; its sums in fp32 whatever the
    dtype, and in bf16 one rounding where transformers' rounds ``x * rsqrt(...)`` before it scales),
    where the written-out form launched six, eight in bf16 (the casts), two or four of them in every
    layer of every step; on the CPU torch composes it of the same six ops, in fp32 the same numbers."""
    import torch.nn.functional as F

    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` in :func:`rope`'s form: its first half (over the last dimension) negated."""
    import torch

    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE in transformers' ``rotate_half`` layout: ``x * cos + rotate_half(x) * sin``, written as
    ``addcmul(x * cos, swap_halves(x), sin_signed)`` (``sin_signed`` is ``sin`` with its first half
    negated): three kernels where transformers' form is six (the negation, the two halves joined, two
    products, the sum), the same products, the second one added without rounding it first (a
    fused multiply-add where the device has one: in bf16 one rounding fewer than transformers').
    ``out``: where to write the result (``x`` itself may be given: both its reads come first)."""
    import torch

    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    if out is not None and torch.compiler.is_compiling():  # Dynamo traces no out= into a strided view;
        return out.copy_(torch.addcmul(x * cos, swapped, sin_signed))  # Inductor fuses the copy in
    return torch.addcmul(x * cos, swapped, sin_signed, out=out)


def fuse_linears(*linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several ``nn.Linear`` on the same input; the modules' own parameters
    become views of it, so the model keeps working and no memory is duplicated."""
    import torch

    weight = torch.cat([lin.weight.data for lin in linears])
    biases = [lin.bias for lin in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.data if b is not None else weight.new_zeros(lin.weight.shape[0])
                          for b, lin in zip(biases, linears)])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = weight[start:start + rows]
        if lin.bias is not None:
            assert bias is not None
            lin.bias.data = bias[start:start + rows]
        start += rows
    return weight, bias


def _norm_weight(module) -> tuple[torch.Tensor, float]:
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps")
    return module.weight, float(eps)


def attention_mask(mask: torch.Tensor | None, groups: int, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean ``[B, T, L]`` mask (True = may attend) as :func:`attention` takes it: additive, in the
    queries' dtype, ``[B, 1, G * T, L]`` (made once per forward, shared by every layer)."""
    import torch

    if mask is None:
        return None
    b, t, length = mask.shape
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias[:, None, None].expand(b, 1, groups, t, length).reshape(b, 1, groups * t, length)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """Grouped attention without copying K/V per query head, in one fused kernel.

    ``q`` ``[B, T, H, D]``; ``keys``/``values`` ``[B, H_kv, L, D]``; ``bias`` from
    :func:`attention_mask` (None: every query sees every key) -> ``[B, T, H * D]``. Query head ``h``
    reads K/V head ``h // (H / H_kv)``, as transformers' ``repeat_kv`` arranges them: the ``G`` query
    heads of a K/V head become ``G * T`` queries of one head, so the attention is a plain one."""
    import torch.nn.functional as F

    b, t, h, d = q.shape
    kv_heads = keys.shape[1]
    g = h // kv_heads
    q = q.view(b, t, kv_heads, g, d).permute(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale)  # [B, H_kv, G * T, D]
    return out.view(b, kv_heads, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, h * d)


def residual_linear(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x + linear(h, weight, bias)`` ``[B, T, hidden]``, the residual added in the matrix product's
    epilogue (``addmm``) where there is no bias."""
    import torch

    if bias is not None:
        return x + torch.nn.functional.linear(h, weight, bias)
    shape = x.shape
    return torch.addmm(x.reshape(-1, shape[-1]), h.reshape(-1, h.shape[-1]), weight.t()).view(shape)


class LeanDecoder:
    """The layers, final norm and RoPE tables of a Llama-family model, run over a :class:`SlotKV`.

    ``inner`` is the model's decoder (the module with ``layers``, ``norm``, ``rotary_emb``);
    ``positions`` is the longest sequence any row will hold (RoPE tables are precomputed up to it)."""

    def __init__(self, inner: Any, config: Any, positions: int) -> None:
        import torch

        from transformers.activations import ACT2FN

        self.hidden = int(config.hidden_size)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or self.hidden // self.heads)
        self.positions = int(positions)
        self.act: Callable = ACT2FN[config.hidden_act]
        self.layers: list[LayerWeights] = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if getattr(attn, "sliding_window", None):
                raise ConfigError("the lean decoder supports full-attention layers only")
            qkv, qkv_bias = fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj)
            gate_up, gate_up_bias = fuse_linears(mlp.gate_proj, mlp.up_proj)
            q_norm = getattr(attn, "q_norm", None)
            k_norm = getattr(attn, "k_norm", None)
            if (q_norm is None) != (k_norm is None):
                raise ConfigError("the lean decoder supports query and key norms together or neither")
            norm1, eps1 = _norm_weight(layer.input_layernorm)
            norm2, eps2 = _norm_weight(layer.post_attention_layernorm)
            self.layers.append(LayerWeights(
                norm1=norm1, eps1=eps1, qkv=qkv, qkv_bias=qkv_bias,
                q_norm=None if q_norm is None else q_norm.weight, k_norm=None if k_norm is None else k_norm.weight,
                qk_eps=0.0 if q_norm is None else _norm_weight(q_norm)[1],
                out=attn.o_proj.weight, out_bias=attn.o_proj.bias, norm2=norm2, eps2=eps2,
                gate_up=gate_up, gate_up_bias=gate_up_bias, down=mlp.down_proj.weight, down_bias=mlp.down_proj.bias))
        self.scale = float(getattr(inner.layers[0].self_attn, "scaling", self.head_dim ** -0.5))
        self.norm, self.norm_eps = _norm_weight(inner.norm)
        weight = self.layers[0].qkv
        self.device, self.dtype = weight.device, weight.dtype
        # RoPE tables from the model's own rotary module (its scaling type and attention factor
        # included), one row per position, plus the scratch position; sin with its first half
        # negated, for :func:`rope`.
        columns = padded_columns(self.positions)
        table = torch.arange(columns, device=self.device)
        cos, sin = inner.rotary_emb(weight.new_zeros(1, dtype=self.dtype), position_ids=table[None, :self.positions + 1])
        self.cos = cos[0]  # [P + 1, D]
        self.sin_signed = signed_sin(sin[0])
        self._key_index = table  # arange, sliced by decode steps (a captured step allocates nothing)
        self.layer_fn: Callable[..., torch.Tensor] = self.layer  # or its compiled form (compile())

    def new_kv(self, slots: int, positions: int | None = None) -> SlotKV:
        """Zeroed K/V for ``slots`` rows of ``positions`` positions (each plus scratch, padded)."""
        import torch

        positions = self.positions if positions is None else positions
        if positions > self.positions:
            raise ValueError(f"{positions} positions asked for; the RoPE tables reach {self.positions}")
        shape = (slots + 1, 2, self.kv_heads, padded_columns(positions), self.head_dim)
        return SlotKV([torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers], positions)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv: SlotKV, rows: slice | torch.Tensor,
                write_rows: torch.Tensor, length: int, mask: torch.Tensor | None,
                layers: list[LayerWeights] | None = None) -> torch.Tensor:
        """Run ``x`` ``[B, T, hidden]`` through the layers; returns the normed hidden states ``[B, T, hidden]``.

        Token ``(b, t)`` is at RoPE position ``positions[b, t]`` and writes its K/V at
        ``(write_rows[b], positions[b, t])``; attention reads positions ``[0, length)`` of the rows
        ``rows`` (``B`` of them, in the order of ``x``: a slice reads a view, an index tensor gathers),
        as ``mask`` ``[B, T, length]`` allows (None: every key). The RoPE rows of ``positions`` are
        gathered from the tables once for every layer. ``layers``: the layers to run instead of
        :attr:`layers`: :meth:`at_position`'s where every token sits at that one position (then no
        RoPE table is read and no rotation runs)."""

        import torch

        with torch.no_grad():  # inference only (a layer writes its rotated queries and keys in place)
            return self._forward(x, positions, kv, rows, write_rows, length, mask,
                                 self.layers if layers is None else layers)

    def _forward(self, x: torch.Tensor, positions: torch.Tensor, kv: SlotKV, rows: slice | torch.Tensor,
                 write_rows: torch.Tensor, length: int, mask: torch.Tensor | None,
                 layers: list[LayerWeights]) -> torch.Tensor:
        b, t, _ = x.shape
        heads, kv_heads = self.heads, self.kv_heads
        if all(layer.rotated for layer in layers):
            cos = sin = None
        else:
            cos = self.cos[positions][:, :, None]  # [B, T, 1, D]
            sin = self.sin_signed[positions][:, :, None]
        bias = attention_mask(mask, heads // kv_heads, x.dtype)
        row_index = write_rows[:, None].expand(b, t)
        for index, layer in enumerate(layers):
            x = self.layer_fn(x, layer, cos, sin, bias, kv.layers[index], row_index, positions, rows, length)
        return rms_norm(x, self.norm, self.norm_eps)

    def layer(self, x: torch.Tensor, layer: LayerWeights, cos: torch.Tensor | None, sin: torch.Tensor | None,
              bias: torch.Tensor | None, kv: torch.Tensor, row_index: torch.Tensor,
              positions: torch.Tensor, rows: slice | torch.Tensor, length: int) -> torch.Tensor:
        """One layer of :meth:`forward` (what :meth:`compile` fuses): ``x`` ``[B, T, hidden]`` in and out,
        this layer's keys and values written into its :class:`SlotKV` buffer ``kv`` at ``(row_index,
        positions)``. The rotated queries and keys are written back into the qkv product, so the new
        keys and values sit side by side there and go into the buffer in one write."""
        import torch.nn.functional as F

        b, t, _ = x.shape
        heads, kv_heads = self.heads, self.kv_heads
        h = rms_norm(x, layer.norm1, layer.eps1)
        qkv = F.linear(h, layer.qkv, layer.qkv_bias).view(b, t, -1, self.head_dim)
        if layer.rotated:  # the weights rotated the queries and keys (at_position's layers)
            pass
        elif cos is None or sin is None:
            raise ValueError("a layer whose weights are not rotated needs the RoPE tables")
        elif layer.q_norm is not None and layer.k_norm is not None:  # both or neither (checked at load)
            q, k = qkv[:, :, :heads], qkv[:, :, heads:heads + kv_heads]  # [B, T, H(kv), D]
            rope(rms_norm(q, layer.q_norm, layer.qk_eps), cos, sin, out=q)
            rope(rms_norm(k, layer.k_norm, layer.qk_eps), cos, sin, out=k)
        else:  # queries and keys rotated together
            qk = qkv[:, :, :heads + kv_heads]
            rope(qk, cos, sin, out=qk)
        kv[row_index, :, :, positions] = qkv[:, :, heads:].unflatten(2, (2, kv_heads))  # [B, T, 2, H_kv, D]
        seen = kv[rows, :, :, :length]  # [B, 2, H_kv, L, D]: a view of rows 0..B-1, or one gather
        attn = attention(qkv[:, :, :heads], seen[:, 0], seen[:, 1], bias, self.scale)
        x = residual_linear(x, attn, layer.out, layer.out_bias)
        gate, up = F.linear(rms_norm(x, layer.norm2, layer.eps2), layer.gate_up, layer.gate_up_bias).chunk(2, -1)
        return residual_linear(x, self.act(gate) * up, layer.down, layer.down_bias)

    def at_position(self, position: int) -> list[LayerWeights]:
        """The layers for tokens that all sit at RoPE position ``position`` (a depth decoder's step:
        every row at the same depth), with that position's rotation folded into the weights.

        RoPE is linear: ``rope(W h + c) = R W h + R c`` with ``R`` the position's rotation, so a
        ``qkv`` whose query and key rows are ``R W`` (and bias ``R c``) gives the rotated queries and
        keys from its one matrix product, and the four kernels of each layer's RoPE never run. The
        rotated weights are made here in fp32 and rounded once to the model's dtype (the same
        products as :func:`rope`, summed in the matrix product: equal to float rounding, tested), and
        take a copy of each layer's ``qkv`` per position (the values' rows are the plain ones).
        Query and key norms (Qwen3) come between the product and the rotation, so such layers
        cannot be folded."""
        import dataclasses

        import torch

        if not 0 <= position < self.cos.shape[0]:
            raise ValueError(f"RoPE position {position} is outside this decoder's {self.cos.shape[0]} positions")
        if self.layers[0].q_norm is not None:
            raise ConfigError("layers with query and key norms rotate after the norm: their RoPE cannot be "
                              "folded into the weights")
        d, rotated_rows = self.head_dim, (self.heads + self.kv_heads) * self.head_dim
        cos, sin = self.cos[position].float(), self.sin_signed[position].float()  # [D]

        def rotate(w: torch.Tensor) -> torch.Tensor:  # rows (head, i) of the queries and keys, [rows, ...]
            x = w[:rotated_rows].float().reshape(self.heads + self.kv_heads, d, -1).transpose(1, 2)  # [H, in, D]
            turned = rope(x, cos, sin).transpose(1, 2)  # each input column's entries rotated as a query is
            return torch.cat((turned.reshape(rotated_rows, *w.shape[1:]).to(w.dtype), w[rotated_rows:]))

        return [dataclasses.replace(layer, qkv=rotate(layer.qkv),
                                    qkv_bias=None if layer.qkv_bias is None else rotate(layer.qkv_bias[:, None])[:, 0],
                                    rotated=True)
                for layer in self.layers]

    def compile(self) -> None:
        """Fuse each layer's kernels (:mod:`duplex.engine.fusion`); compiled on first use of a shape."""
        from duplex.engine.fusion import compile_fn

        self.layer_fn = compile_fn(self.layer)

    # -- the two shapes every engine uses --------------------------------------------------------

    def prefill(self, x: torch.Tensor, kv: SlotKV, row: int, start: int) -> torch.Tensor:
        """Run ``x`` ``[T, hidden]`` into row ``row`` at positions ``start..start+T-1`` (causal);
        returns the normed hidden states ``[T, hidden]``."""
        import torch

        t = x.shape[0]
        end = start + t
        if end > kv.positions:
            raise RuntimeError(f"a prefill to position {end} does not fit {kv.positions} positions; "
                               "evict or truncate first")
        positions = torch.arange(start, end, device=self.device)[None]  # [1, T]
        mask = torch.arange(end, device=self.device)[None, None, :] <= positions[:, :, None]  # [1, T, end]
        rows = torch.tensor([row], device=self.device)
        return self.forward(x[None], positions, kv, slice(row, row + 1), rows, end, mask)[0]

    def prefill_rows(self, x: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
                     kv: SlotKV) -> torch.Tensor:
        """Several rows' prefills in one pass of static shapes (a step a CUDA graph can hold): entry
        ``i`` runs ``x[i, :counts[i]]`` into K/V row ``rows[i]`` at positions ``starts[i]..``; ``x``
        ``[B, T, hidden]``, ``rows``, ``starts``, ``counts`` ``[B]`` device tensors. An entry's other
        tokens (all of a padding entry's) run at the scratch position, which only their scratch
        column sees; attention reads every column of each row, so the shapes are ``B`` and ``T``
        whatever the rows hold. Returns the normed hidden states ``[B, T, hidden]``."""
        import torch

        step = self.key_index(x.shape[1])[None]  # [1, T]
        positions = torch.where(step < counts[:, None], starts[:, None] + step, kv.scratch_position)  # [B, T]
        length = kv.columns
        mask = self.key_index(length)[None, None, :] <= positions[:, :, None]  # [B, T, L]
        return self.forward(x, positions, kv, rows, rows, length, mask)

    def decode(self, x: torch.Tensor, positions: torch.Tensor, kv: SlotKV, rows: torch.Tensor,
               length: int | None = None, *, read_rows: slice | None = None) -> torch.Tensor:
        """One token for each of ``B`` entries: ``x`` ``[B, hidden]`` at ``positions`` ``[B]``, entry
        ``i`` on K/V row ``rows[i]`` (an entry without a token sits at the scratch position, of its own
        row or of the scratch row) -> normed hidden ``[B, hidden]``. Attention reads the first ``length``
        positions of each entry's row (all of them by default; an entry's position must be below it
        unless it is the scratch position). The rows are gathered by index, so a step's batch is the
        entries that step, wherever their rows are; ``read_rows`` (``slice(0, B)`` when ``rows`` is
        ``0..B-1``) reads them as a view instead. ``rows`` is a tensor the caller keeps, so a captured
        step allocates nothing."""
        length = kv.columns if length is None else length
        mask = self.key_index(length)[None, None, :] <= positions[:, None, None]  # [B, 1, L]
        read = rows if read_rows is None else read_rows
        return self.forward(x[:, None], positions[:, None], kv, read, rows, length, mask)[:, 0]

    def key_index(self, length: int) -> torch.Tensor:
        """``arange(length)``: a slice of one table made at load, so the first call of a step runs the
        same ops as every later one (what a captured graph replays)."""
        if length > self._key_index.shape[0]:
            raise ValueError(f"attention over {length} positions; this decoder holds {self._key_index.shape[0]}")
        return self._key_index[:length]
