"""Greedy decoding for `eval-llava --mode generate`: the tokens transformers' `generate(do_sample=False)` picks, with
less work per token.

- **Prefill.** Prompts are right-padded (a causal row never sees the padding after it); the system prompt's keys
  and values come from `SharedPrefixForward` (computed once a run: the LLM is frozen), the last layer runs its
  queries and MLP at each row's last prompt position only, and every layer's keys and values go straight into the
  cache.
- **Decode.** The KV cache has a fixed number of slots and is written in place (transformers' dynamic cache copies
  the whole cache at every step to append one token). Every step has the same shapes, so on a GPU it is recorded
  once as a CUDA graph and replayed: the same kernels as the eager step, so the same tokens, without launching
  each of a step's many small kernels from Python.
- **Finished rows.** A row stops at `</s>` (or where a `stop` rule says); the batch stops when every row has.
  When at most half of a workspace's rows still run, the live ones move to a workspace of half the rows (one per
  size, kept for the run with its graph), so a few long answers do not keep a whole batch's cache busy.

Cache layout: row r's prompt fills slots [0, L_r) (right-padded to W, the batch's longest prompt); the token fed at
decode step t goes to slot W + t in every row; a boolean mask per row hides the padding slots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from mysproj.models.shared_prefix import SharedPrefixForward, cached_layer_step

log = logging.getLogger(__name__)
SLOT_MULTIPLE = 64  # cache slots are rounded up, so batches whose prompts differ by a few tokens share a workspace
# GenerationConfig fields that add a logits processor to greedy search, with the values that leave it out.
_PROCESSORS_OFF = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
                   "min_length": (None, 0), "min_new_tokens": (None, 0), "forced_bos_token_id": (None,),
                   "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
                   "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
                   "guidance_scale": (None, 1.0), "watermarking_config": (None,)}


def unsupported(llava) -> str | None:
    """Why this model's greedy answers cannot come from `GreedyDecoder` (None: they can): its layer functions are
    LlamaDecoderLayer's, and plain greedy search is argmax only, so a generation config that adds a logits
    processor (a repetition penalty, suppressed tokens, ...) needs transformers' generate."""

    if not SharedPrefixForward.supports(llava):
        return "the language model is not a frozen Llama"
    gen = getattr(llava, "generation_config", None)
    on = sorted(k for k, off in _PROCESSORS_OFF.items() if getattr(gen, k, None) not in off)
    return f"its generation config sets {', '.join(on)}" if on else None


@dataclass
class Workspace:
    """The decode state of `rows` rows, updated in place (a CUDA graph reads and writes these very tensors)."""
    keys: list            # per layer [rows, kv heads, slots, head dim]
    values: list
    visible: Any          # [rows, 1, 1, slots] bool: the slots each row attends to
    tokens: Any           # [rows] the token each row feeds next
    positions: Any        # [rows] its position id
    slot: Any             # [1] the cache slot it is written to
    graph: Any = None

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]


def decode_step(llava, ws: Workspace) -> None:
    """Feed `ws.tokens` and replace them with the greedy next tokens, one slot further."""

    lm = llava.model.language_model
    ws.visible.index_fill_(-1, ws.slot, True)
    h = lm.embed_tokens(ws.tokens[:, None])
    cos, sin = lm.rotary_emb(h, ws.positions[:, None])
    for layer, k, v in zip(lm.layers, ws.keys, ws.values):
        h = cached_layer_step(layer, h, cos, sin, k, v, ws.slot, ws.visible)
    ws.tokens.copy_(llava.lm_head(lm.norm(h))[:, -1].argmax(-1))
    ws.positions.add_(1)
    ws.slot.add_(1)


class GreedyDecoder:
    """`decoder(prompts, pixel_values, max_new_tokens)` -> each row's greedy tokens up to (without) `</s>`.
    `max_rows`: the usual batch (the largest workspace; smaller ones halve it). `cuda_graphs`: replay decode steps
    as CUDA graphs (GPU only). `compile_prefill`: torch.compile the prefill's layer functions."""

    def __init__(self, llava, *, eos_id: int, pad_id: int, max_rows: int, cuda_graphs: bool = False,
                 compile_prefill: bool = False):
        self.llava, self.eos_id, self.pad_id, self.max_rows = llava, eos_id, pad_id, max_rows
        self.fast = SharedPrefixForward(llava, compile=compile_prefill)
        self.device = llava.lm_head.weight.device
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.slots = 0
        self.spaces: dict[int, Workspace] = {}
        self.stats = {"prefills": 0, "steps": 0, "moves": 0, "graphs": 0}

    def __call__(self, prompts: list[list[int]], pixel_values, max_new_tokens: int, stop=None) -> list[list[int]]:
        """`stop(answer_ids, token)`: a row also ends where it returns True (the token is not kept)."""

        with torch.no_grad():
            return self._decode(prompts, pixel_values, max_new_tokens, stop)

    def bucket(self, n: int) -> int:
        """Rows of the workspace for `n` rows: `max_rows` halved while `n` still fits."""
        size = max(self.max_rows, n)
        while size // 2 >= n:
            size //= 2
        return size

    def _decode(self, prompts, pixel_values, max_new_tokens: int, stop=None) -> list[list[int]]:
        n = len(prompts)
        width = max(len(p) for p in prompts)
        ws = self.workspace(self.bucket(n), width + max_new_tokens)
        self._prefill(ws, prompts, pixel_values)
        answers: list[list[int]] = [[] for _ in range(n)]
        owner, live = list(range(n)), list(range(n))  # prompt of each workspace row; rows still generating
        for step in range(max_new_tokens):
            if step:
                self._advance(ws)
            tokens = ws.tokens.tolist()
            live = [r for r in live if tokens[r] != self.eos_id
                    and not (stop is not None and stop(answers[owner[r]], tokens[r]))]
            for r in live:
                answers[owner[r]].append(tokens[r])
            if not live or step == max_new_tokens - 1:
                break
            if self.bucket(len(live)) < ws.rows:
                ws = self._move(ws, live)
                owner, live = [owner[r] for r in live], list(range(len(live)))
        return answers

    def workspace(self, rows: int, slots: int) -> Workspace:
        """The workspace of `rows` rows; all are rebuilt (graphs too) when a batch needs more slots."""

        if slots > self.slots:
            self.spaces.clear()
            self.slots = -(-slots // SLOT_MULTIPLE) * SLOT_MULTIPLE
        if rows not in self.spaces:
            lm = self.llava.model.language_model
            attn = lm.layers[0].self_attn
            shape = (rows, lm.config.num_key_value_heads, self.slots, attn.head_dim)
            dtype, dev = lm.embed_tokens.weight.dtype, self.device
            self.spaces[rows] = Workspace(
                keys=[torch.zeros(shape, dtype=dtype, device=dev) for _ in lm.layers],
                values=[torch.zeros(shape, dtype=dtype, device=dev) for _ in lm.layers],
                visible=torch.zeros((rows, 1, 1, self.slots), dtype=torch.bool, device=dev),
                tokens=torch.zeros(rows, dtype=torch.long, device=dev),
                positions=torch.zeros(rows, dtype=torch.long, device=dev),
                slot=torch.zeros(1, dtype=torch.long, device=dev))
        return self.spaces[rows]

    def _prefill(self, ws: Workspace, prompts, pixel_values) -> None:
        """Fill the cache with the prompts and set each row's first generated token; rows past len(prompts) copy
        row 0 (their answers are never read, but they must attend to something)."""

        n, lengths = len(prompts), [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p, dtype=torch.long), 1
        last = torch.tensor(lengths) - 1
        prefix = self.fast.prefix(ids, mask, last)
        lm = self.llava.model.language_model
        layers = list(lm.layers)
        past = self.fast.prefix_kv(ids[:1, :prefix]) if prefix else [(None, None)] * len(layers)
        h, cos, sin = self.fast.embed(ids, pixel_values, prefix)
        for i, (layer, (pk, pv)) in enumerate(zip(layers[:-1], past[:-1])):
            h, k, v = self.fast.layer_step(layer, h, cos, sin, pk, pv)
            if prefix:
                ws.keys[i][:n, :, :prefix] = pk
                ws.values[i][:n, :, :prefix] = pv
            ws.keys[i][:n, :, prefix:width] = k
            ws.values[i][:n, :, prefix:width] = v
        ends = sorted(set(lengths))
        rows = torch.tensor([e - 1 - prefix for e in ends], device=self.device)
        out, k, v = self.fast.last_layer_rows(layers[-1], h, cos, sin, *past[-1], rows, return_kv=True)
        ws.keys[-1][:n, :, :width] = k
        ws.values[-1][:n, :, :width] = v
        pick = torch.tensor([ends.index(e) for e in lengths], device=self.device)
        first = self.llava.lm_head(lm.norm(out[torch.arange(n, device=self.device), pick])).argmax(-1)
        fill = torch.tensor(lengths + [lengths[0]] * (ws.rows - n), device=self.device)
        ws.visible.copy_((torch.arange(self.slots, device=self.device)[None] < fill[:, None])[:, None, None])
        ws.tokens.copy_(torch.cat([first, first[:1].expand(ws.rows - n)]))
        ws.positions.copy_(fill)
        ws.slot.fill_(width)
        self.stats["prefills"] += 1

    def _advance(self, ws: Workspace) -> None:
        self.stats["steps"] += 1
        if ws.graph is not None:
            ws.graph.replay()
        elif self.cuda_graphs:
            self._capture(ws)
        else:
            decode_step(self.llava, ws)

    def _capture(self, ws: Workspace) -> None:
        """Run this step eagerly on a side stream (as CUDA graph capture asks: it also warms up cuBLAS and the
        allocator), then record the step; recording executes nothing, so the state moves on by one step only."""

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            decode_step(self.llava, ws)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the DataLoader's pin-memory thread keeps making CUDA calls during the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                decode_step(self.llava, ws)
        except RuntimeError as e:
            log.warning("generate: decode steps could not be recorded as a CUDA graph (%s); running them eagerly",
                        str(e).splitlines()[0])
            self.cuda_graphs = False
            return
        ws.graph = graph
        self.stats["graphs"] += 1

    def _move(self, ws: Workspace, rows: list[int]) -> Workspace:
        """The state of `rows` of `ws` copied into the smaller workspace that fits them (padded with copies of the
        first)."""

        new = self.workspace(self.bucket(len(rows)), self.slots)
        index = torch.tensor(rows + [rows[0]] * (new.rows - len(rows)), device=self.device)
        for src, dst in zip(ws.keys + ws.values, new.keys + new.values):
            torch.index_select(src, 0, index, out=dst)
        for name in ("visible", "tokens", "positions"):
            torch.index_select(getattr(ws, name), 0, index, out=getattr(new, name))
        new.slot.copy_(ws.slot)
        self.stats["moves"] += 1
        return new
