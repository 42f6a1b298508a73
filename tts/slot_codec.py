"""The Mimi decoder stepped inside the TTS frame step: one frame per row, the state in static rows.

:class:`~duplex.tts.codec.StreamingDecoder` keeps each stream's state in a :class:`CodecState` of its
own, so decoding several replies at once meant stacking their states, decoding, and splitting them
back, after the frame step's codes had been copied to the host (a second host sync in every tick
where a chunk was due). :class:`SlotDecoder` keeps every stream's state in buffers allocated once,
one row per TTS reply row (conv left contexts ``[rows, C, pad]``, transposed-conv tails
``[rows, C, k - s]``, the transformer's rings ``[rows, 2, H, window - 1 + 2, D]`` with per-row valid
counts and positions on the device), and decodes the frame each row just sampled, for rows
``0..b-1`` at once, in the frame step itself. The step's shapes depend only on ``b``, it reads and
writes only device buffers, and it asks the host nothing, so it is part of the captured frame graph
and the tick's one copy brings codes and audio together.

A row's state moves on only where ``commit`` is set: a row that stepped (not a padding row of the
bucket) and whose frame is not the end-of-audio frame. The end frame is decoded like any other
(whether a frame is the end is known on the device, not yet on the host), its audio is dropped by the
host, and the state stays as it was, so the reply's next segment joins its last audible frame
seamlessly. Decoding frame by frame equals decoding in chunks to float rounding (the codec is
causal; ``tests/test_tts_codec.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from duplex.tts.codec import CodecState, StreamingDecoder, WindowKV, padding_total

if TYPE_CHECKING:  # heavy imports stay lazy
    import torch
    from transformers import MimiModel


class SlotDecoder:
    """A Mimi decoder with the streaming state of ``rows`` streams in static buffers, one frame a step."""

    def __init__(self, codec: MimiModel, rows: int) -> None:
        import torch
        from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiConvTranspose1d

        if rows < 1:
            raise ValueError(f"the slot decoder needs at least one row, got {rows}")
        self.streaming = StreamingDecoder(codec)
        self.frame_size = self.streaming.frame_size
        self.num_codebooks = self.streaming.num_codebooks
        self.rows = rows
        decoder = self.streaming.decoder
        p = next(decoder.parameters())
        self.device, self.dtype = p.device, p.dtype
        # the state of one stream before its first frame, as StreamingDecoder sees it: zero left
        # contexts (or, with replicate padding, the first input repeated: see ``fresh``), no tails
        self._replicate = {name for name, m in self._named(decoder) if isinstance(m, MimiConv1d)
                           and m.pad_mode == "replicate"}
        self.context: dict[str, torch.Tensor] = {}
        self.overlap: dict[str, torch.Tensor] = {}
        for name, module in self._named(decoder):
            if isinstance(module, MimiConv1d):
                self.context[name] = torch.zeros(rows, module.conv.in_channels, padding_total(module),
                                                 device=self.device, dtype=self.dtype)
            elif isinstance(module, MimiConvTranspose1d):
                conv = module.conv
                self.overlap[name] = torch.zeros(rows, conv.out_channels, conv.kernel_size[0] - conv.stride[0],
                                                 device=self.device, dtype=self.dtype)
        # the transformer's rings, one frame's positions of room: a step writes its keys and values in
        # place, and a row whose frame is not committed writes the same columns again next time
        window = self.streaming.new_state(rows, steps=self.streaming.steps_per_frame).kv
        self.rings, self.window = window.kv, window.window
        self.valid = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.position = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.fresh = torch.ones(rows, dtype=torch.bool, device=self.device)  # no frame decoded yet
        from transformers.models.mimi.modeling_mimi import MimiEuclideanCodebook

        for module in codec.quantizer.modules():  # each codebook's table is made on first use: now, not in a step
            if isinstance(module, MimiEuclideanCodebook):
                module.embed  # noqa: B018

    @staticmethod
    def _named(decoder):
        """The decoder's convolutions under the names :mod:`duplex.tts.codec` keeps their state by."""
        from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiResnetBlock

        if decoder.upsample is not None:
            yield "upsample", decoder.upsample
        for index, layer in enumerate(decoder.decoder_seanet.layers):
            name = f"seanet.{index}"
            if isinstance(layer, MimiResnetBlock):
                for sub_index, sub in enumerate(layer.block):
                    if isinstance(sub, MimiConv1d):
                        yield f"{name}.{sub_index}", sub
                if isinstance(layer.shortcut, MimiConv1d):
                    yield f"{name}.shortcut", layer.shortcut
            else:
                yield name, layer

    def reset(self, row: int) -> None:
        """Row ``row`` starts a new stream (a new reply on that TTS row)."""
        for t in (*self.context.values(), *self.overlap.values(), *self.rings):
            t[row].zero_()
        self.valid[row] = 0
        self.position[row] = 0
        self.fresh[row] = True

    def step(self, codes: torch.Tensor, commit: torch.Tensor) -> torch.Tensor:
        """Decode one frame for rows ``0..b-1``: ``codes`` ``[b, K]`` -> audio ``[b, frame_size]``; each
        row's state moves on only where ``commit`` (``[b]`` bool) is set."""
        import torch

        b = codes.shape[0]
        state = CodecState(WindowKV([t[:b] for t in self.rings], self.window, self.valid[:b], self.position[:b]),
                           {n: t[:b] for n, t in self.context.items()}, {n: t[:b] for n, t in self.overlap.items()},
                           fresh=self.fresh[:b] if self._replicate else None)
        audio = self.streaming.decode(codes[:, :, None], state)  # [b, frame_size]
        # each row of each buffer takes its new value where commit is set (in place: no copy of its own)
        keep = commit[:, None, None]
        for name, buffer in self.context.items():
            torch.where(keep, state.conv_context[name], buffer[:b], out=buffer[:b])
        for name, buffer in self.overlap.items():
            torch.where(keep, state.overlap[name], buffer[:b], out=buffer[:b])
        for buffer, counts in ((self.valid, state.kv.valid), (self.position, state.kv.position)):
            torch.where(commit, torch.as_tensor(counts), buffer[:b], out=buffer[:b])
        self.fresh[:b].logical_and_(~commit)
        return audio
