"""Fast transformers-weights backend: static KV cache, one CUDA graph per decode step, continuous batching.

    backend = FastHFBackend("results/models/smollm2/base", batch_size=256, dtype="bfloat16")
    backend.generate(prompts, SamplingParams(max_new_tokens=256))
    FastHFBackend(model_ref, batch_size=0, continuous=False)   # batch after batch (the reference schedule)
    FastHFBackend(model_ref, batch_size=1280, prompt_rows=20)  # a prompt's n = 20 samples start together

Same interface and outputs as HFBackend (greedy when temperature == 0, otherwise temperature +
top-p sampling with `n` samples per prompt, stop on EOS per sequence), but decoding does not go
through `model.generate`:

- prefill runs the model's own layers over a prompt once and writes its K/V into a preallocated
  cache [rows, kv heads, slots, head dim] per layer;
- one decode step (embedding, layers, head, token choice, EOS bookkeeping, cache write, position
  advance) only touches fixed buffers, so on CUDA it is captured once as a CUDA graph and
  replayed: one launch per token instead of ~1000 kernel launches from Python;
- continuous batching (`continuous`, on by default; privcode.synth.batching): every row has its
  own write slot, position and token count, and a row that ends (EOS or max_new_tokens) is given
  the next waiting prompt or sample between two steps (a prefill into its freed cache row), so the
  batch stays full when outputs end at EOS instead of running until its longest row ends. Checked
  every REFILL_EVERY steps (one host sync). Prompts start longest first; with a prompt cache a
  call runs in `length_segments` (one prompt-cache length each, at most twice a prompt's own);
- each row draws its tokens from its own random stream, a function of (seed, prompt index, sample
  index, token index) (`sampling.row_exponential`), so its tokens do not depend on the batch
  size, on which row or step computes them, or on `continuous`; the prompt index is
  `SamplingParams.streams[i]` when given (a stage passes each prompt's index in its whole input, so
  its outputs do not depend on how it cuts the input into calls either);
- attention of the single new query reads only the cache slots written so far (rounded up to
  SLOT_BUCKET: one graph per such length, for the highest slot a live row writes), with a
  validity mask per row; grouped-query heads are folded into the query axis so no K/V is repeated;
  on CUDA it is PyTorch's memory-efficient attention kernel (`decoder.attend`: scores stay on chip),
  and a row's attention over the shared prompt cache and over its own cache are merged by their
  log-sum-exps (one softmax over both);
- optionally (`compile_layers`) the two halves of a decode layer around its attention and that merge
  run under torch.compile, one graph each for every layer, which fuses the element-wise work between
  the GEMMs;
- `batch_size` 0 sizes the batch from the free GPU memory (`rows_for_memory`, measured once per
  shape and reused by later calls with prompts no longer than it was measured for); without a GPU
  (or an architecture the decoder does not drive) it is CPU_AUTO_ROWS rows;
- with `n` samples per prompt each prompt is prefilled once and its K/V kept once, in a prompt
  cache that a group of rows reads together; each row's own cache holds its generated slots. A
  group of `prompt_rows` rows (default: n; n / GROUP_SPLIT rounded up with continuous batching and one
  prompt cache per group) decodes one prompt's n samples, a freed row starting the next sample. With
  `prompt_caches` 2 to 4 (4, the default where rows end at different steps) a group has that many
  prompt caches, and once the prompt's samples have all started a freed row loads the next prompt
  into one no live row reads (rows keep decoding while a group's last samples finish; on CUDA the
  kernel reads each cache once for the rows that hold it, `decoder.attend_held`; the math path
  computes all of them and keeps each row's); with 1, the group takes the next prompt once all its
  rows are free: smaller groups refill sooner, larger ones read prompt caches less;
- top-p sampling does not sort the vocabulary (`top_p_sample`: an exponential race, exact but
  for an event of probability <= 1e-12 per token, where it takes the most probable token); on CUDA
  the row noise, softmax and race run under torch.compile (fused passes over [rows, vocab]).

Supported: decoder-only models whose layers look like Llama/Qwen2/Qwen3/Mistral
(input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp) with full attention.
Anything else (or a failed capture) falls back to HFBackend / eager decoding. On CPU the same
decode step runs eagerly (no graphs).
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from privcode.synth.base import Backend, SamplingParams, cut_at_stop
from privcode.synth.batching import decode
from privcode.synth.decoder import Decoder, bucket
from privcode.synth.runner import Runner
from privcode.synth.sampling import top_p_sample

log = logging.getLogger(__name__)

MEM_FRACTION = 0.8      # batch_size 0: rows fill this share of the free GPU memory (the rest: allocator slack)
MAX_AUTO_ROWS = 4096    # ... and at most this many rows (past ~1-2k rows decoding is compute-bound anyway)
CPU_AUTO_ROWS = 32      # batch_size 0 without a GPU
AUTO_CACHES = 4         # prompt caches per group where rows end at different steps: 8B sampling, H100, 6 prompts
                        # per group: 4 caches 1.17x 2 with long-tailed lengths, level with 3 with uniform ones
GROUP_SPLIT = 4         # continuous batching with one prompt cache per group (prompt_caches=1): rows per prompt =
                        # n / this (rounded up) unless prompt_rows is set; else n (docs/performance.md, #17)


def rows_for_memory(free_bytes: int, *, layers: int, kv: int, head_dim: int, dtype_bytes: int, vocab: int,
                    hidden: int, prompt_len: int, new_tokens: int, reps: int = 1, shared: bool | None = None,
                    caches: int = 1) -> int:
    """The most rows (sequences) whose decoding state fits in MEM_FRACTION of `free_bytes`, rounded down
    to a power of two (graphs are reused across batches), then to a multiple of `reps` (the rows that
    share a prompt cache); at least `reps`.
    Per row: its own K/V cache (generated slots only with a prompt cache, `shared`, default reps > 1;
    else prompt + generated), its share of its group's `caches` prompt caches, four fp32 vocabulary-sized
    buffers (logits, probabilities, the sampler's keys and its noise) and a few hidden-sized activations."""
    shared = reps > 1 if shared is None else shared
    own = bucket(new_tokens) if shared else bucket(prompt_len + new_tokens)
    kv_row = 2 * layers * kv * head_dim * dtype_bytes
    per_row = kv_row * own + (kv_row * bucket(prompt_len) * caches / reps if shared else 0) \
        + 4 * 4 * vocab + 16 * hidden * dtype_bytes
    rows = int(MEM_FRACTION * free_bytes // per_row)
    rows = min(rows, MAX_AUTO_ROWS)
    rows = 1 << (rows.bit_length() - 1) if rows >= 1 else 0
    return max(reps, rows - rows % reps)


def length_segments(order: list[int], prompts: list[list[int]]) -> list[list[int]]:
    """`order` (longest prompt first) cut where the prompt cache could halve: a segment's prompts are
    longer than half its first one's bucketed length, so the prompt cache its steps read (that many
    slots for every prompt) is at most twice a prompt's own."""
    segs: list[list[int]] = []
    for i in order:
        if not segs or 2 * bucket(len(prompts[i])) <= bucket(len(prompts[segs[-1][0]])):
            segs.append([])
        segs[-1].append(i)
    return segs


class FastHFBackend(Backend):
    name = "fast"

    def __init__(self, model_ref: str | None = None, batch_size: int = 64, dtype: str = "bfloat16",
                 cuda_graphs: bool = True, *, model=None, tokenizer=None, eos_token_id=None, pad_token_id=None,
                 sampler=top_p_sample, share_prefix: bool = True, compile_layers: bool = False,
                 continuous: bool = True, prompt_rows: int = 0, attention: str = "auto", prompt_caches: int = 0):
        if model is None:
            from privcode.models import default_device, load_model, load_tokenizer

            device = default_device()
            tokenizer = load_tokenizer(model_ref, padding_side="left")
            model = load_model(model_ref, dtype=dtype, device=device)
        self.model = model.eval()
        self.tok = tokenizer
        self.eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)
        self.batch_size = batch_size
        self.cuda_graphs = cuda_graphs
        self.sampler = sampler            # top_p_sample, or sort_top_p_sample (the reference)
        self.share_prefix = share_prefix  # n samples of a prompt: one prefill (False: n copies, the reference)
        self.continuous = continuous      # refill finished rows (False: batch after batch; same tokens)
        self.prompt_rows = prompt_rows    # rows decoding one prompt's samples at a time (0: group_rows' default)
        if prompt_caches not in (0, 1, 2, 3, 4):
            raise ValueError(f"prompt_caches must be 0 (auto) or 1 to 4, not {prompt_caches!r}")
        # prompt caches per group of rows: 2+ let freed rows start the next prompt while the group finishes
        # the last one(s) (0: AUTO_CACHES with continuous batching where rows end at different steps, else 1;
        # more keep more rows busy with long-tailed lengths, for more memory: docs/performance.md)
        self.prompt_caches = prompt_caches
        # compile_layers: torch.compile the decode layers' halves around the attention (fused element-wise
        # work; two compiles per process and batch shape): for long GPU jobs, off for short ones
        # attention: "auto" (on CUDA in fp16/bf16 the own caches through privcode's Triton kernel,
        # own_attention.py, and the prompt caches through the memory-efficient kernel), "efficient" (that
        # kernel for both), "flash" (own caches through FlashAttention-2's decoding kernel: fp16/bf16 on CUDA),
        # "flex" (own caches through flex_attention compiled: head dim >= 16, longer first call), "triton" or
        # "math"; every path is probed at start-up (decoder.resolve_attention), measured in docs/performance.md
        self.dec = Decoder(model, compile_layers, attention) if Decoder.supports(model) else None
        self._runners: OrderedDict = OrderedDict()
        self._sized: dict = {}  # batch_size 0: (new tokens, reps, shared, caches) -> (prompt length bucket, rows)
        self._fallback = None
        if self.dec is None:
            log.warning("FastHFBackend: %s is not a supported architecture; using model.generate",
                        getattr(model.config, "model_type", type(model).__name__))

    @property
    def tokenizer(self):
        return self.tok

    def _runner(self, B, S, temperature, top_p, ignore_eos, reps=1, prefix=0, caches=1) -> Runner:
        key = (B, S, float(temperature), float(top_p), bool(ignore_eos), self.sampler, reps, prefix, caches)
        if key in self._runners:
            self._runners.move_to_end(key)
            return self._runners[key]
        while len(self._runners) >= 2:  # bound cache memory: keep the two most recent shapes
            self._runners.popitem(last=False)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        r = Runner(self.dec, B, S, temperature=temperature, top_p=top_p, eos=self.eos, pad=self.pad,
                    ignore_eos=ignore_eos, use_graph=self.cuda_graphs, sampler=self.sampler, reps=reps,
                    prefix=prefix, caches=caches)
        self._runners[key] = r
        return r

    def auto_rows(self, prompt_len: int, new_tokens: int, reps: int, shared: bool = False, caches: int = 1) -> int:
        """batch_size 0: rows from the free memory of the model's GPU (rows_for_memory), measured once
        per (new_tokens, reps, shared, caches) and reused for prompts up to the bucketed length it was measured
        for (a stage's later calls keep their runners and graphs); CPU_AUTO_ROWS (a multiple of `reps`)
        without a GPU or a supported architecture."""
        p = next(self.model.parameters())
        if p.device.type != "cuda" or self.dec is None:
            return max(reps, CPU_AUTO_ROWS - CPU_AUTO_ROWS % reps)
        key = (new_tokens, reps, shared, caches)
        if key in self._sized and self._sized[key][0] >= bucket(prompt_len):
            return self._sized[key][1]
        self._runners.clear()  # their caches would be counted as used
        torch.cuda.empty_cache()
        cfg = self.model.config
        rows = rows_for_memory(torch.cuda.mem_get_info(p.device)[0], layers=len(self.dec.layers), kv=self.dec.kv,
                               head_dim=self.dec.hd, dtype_bytes=p.element_size(), vocab=cfg.vocab_size,
                               hidden=cfg.hidden_size, prompt_len=prompt_len, new_tokens=new_tokens,
                               reps=reps, shared=shared, caches=caches)
        log.info("batch_size 0: %d rows fit in the free GPU memory", rows)
        self._sized[key] = (bucket(prompt_len), rows)
        return rows

    def rows(self, prompt_len: int, params: SamplingParams, ignore_eos: bool = False, lengths=None) -> int:
        """Rows (sequences) a call whose longest prompt has `prompt_len` tokens decodes at once:
        batch_size, or with batch_size 0 what auto_rows sizes (privcode.synth.calls sizes a stage's
        calls from it)."""
        k = params.n if params.temperature > 0 else 1
        shared = self.share_prefix and k > 1
        g = self.group_rows(k) if shared else 1
        if self.batch_size > 0:
            return self.batch_size
        return self.auto_rows(prompt_len, params.max_new_tokens, g, shared,
                              self.caches(k, ignore_eos, lengths) if shared else 1)

    def caches(self, k: int, ignore_eos: bool, lengths) -> int:
        """Prompt caches per group of rows (`prompt_caches`; 0: AUTO_CACHES where a group's rows can end at
        different steps -- with continuous batching, unless EOS is ignored and every row runs to one length:
        max_new_tokens, or the one length all `lengths` give -- else one)."""
        if self.prompt_caches:
            return self.prompt_caches
        together = ignore_eos and (lengths is None or len({n for per in lengths for n in per}) <= 1)
        return AUTO_CACHES if self.continuous and not together else 1

    def _hf_generate_ids(self, batch, params, ignore_eos):
        dev = next(self.model.parameters()).device
        P = max(map(len, batch))
        ids = torch.tensor([[self.pad] * (P - len(x)) + list(x) for x in batch], device=dev)
        am = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in batch], device=dev)
        kw = {"max_new_tokens": params.max_new_tokens, "pad_token_id": self.pad, "eos_token_id": self.eos}
        if ignore_eos:
            kw["min_new_tokens"] = params.max_new_tokens
        if params.temperature > 0:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            return self.model.generate(input_ids=ids, attention_mask=am, **kw)[:, P:].cpu()

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams, progress=None,
                     ignore_eos: bool = False, lengths=None) -> list[list[list[int]]]:
        """Token-level generate: per prompt, `n` (1 when greedy) lists of new token ids, cut
        after EOS (kept whole with ignore_eos, for benchmarks on random weights). lengths[i][j]
        (benchmarks): sample j of prompt i stops after that many tokens, as if it drew EOS there.
        Sample j of prompt i draws from the stream of identity streams[i] * n + j (params.streams,
        default i)."""
        k = params.n if params.temperature > 0 else 1
        if not prompt_ids:
            return []
        streams = self._streams(params, len(prompt_ids), k)
        prompts = [list(x) or [self.pad] for x in prompt_ids]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        P, new = len(prompts[order[0]]), params.max_new_tokens
        shared = self.share_prefix and k > 1
        g = self.group_rows(k) if shared else 1
        max_rows = self.rows(P, params, ignore_eos, lengths)
        S = bucket(new) if shared else bucket(P + new)
        if self.dec is None or (self.dec.window is not None and bucket(P + new) > self.dec.window):
            out = self._batched_hf(prompts, order, params, k, max_rows, ignore_eos, progress, streams)
            return out if lengths is None else [[r[:max(1, n)] for r, n in zip(per, ns)]
                                                for per, ns in zip(out, lengths)]
        out: list = [None] * len(prompts)
        for seg in (length_segments(order, prompts) if shared else [order]):
            # groups (shared: a prompt's samples can spread over k / g of them) or rows that can run at once
            units = len(seg) * -(-k // g) if shared else len(seg) * k
            cap = max(1, max_rows // g)
            U = min(1 << (min(units, cap) - 1).bit_length(), cap)  # a power of two where it fits: few graph sizes
            r = self._runner(U * g, S, params.temperature, params.top_p, ignore_eos, g,
                             bucket(len(prompts[seg[0]])) if shared else 0, self.caches(k, ignore_eos, lengths))
            for i, per in decode(r, prompts, seg, k=k, max_new=new, seed=params.seed, continuous=self.continuous,
                                 lengths=lengths, progress=progress, streams=streams).items():
                out[i] = self._cut(per, ignore_eos)
        return out

    @staticmethod
    def _streams(params: SamplingParams, count: int, k: int) -> list[int]:
        """params.streams (default 0..count-1), checked: one per prompt, and with sampling every
        (identity, token) counter below 2**32 (`sampling.row_keys`) so no two rows share noise."""
        streams = list(range(count)) if params.streams is None else [int(x) for x in params.streams]
        if len(streams) != count:
            raise ValueError(f"SamplingParams.streams has {len(streams)} entries for {count} prompts")
        if params.temperature > 0 and streams and (min(streams) < 0 or
                                                   (max(streams) + 1) * k * params.max_new_tokens > 1 << 32):
            raise ValueError(f"stream indices 0..{max(streams)} x n={k} x max_new_tokens={params.max_new_tokens} "
                             "exceed the 2**32 counters of the sampling noise (sampling.row_keys)")
        return streams

    def _cut(self, rows, ignore_eos):
        """Each row up to and with its first EOS."""
        if self.eos is None or ignore_eos:
            return rows
        return [row[: row.index(self.eos) + 1] if self.eos in row else row for row in rows]

    def group_rows(self, k: int) -> int:
        """Rows that decode one prompt's k samples at a time (they share its prompt cache)."""
        if self.prompt_rows > 0:
            return min(self.prompt_rows, k)
        return -(-k // GROUP_SPLIT) if self.continuous and self.prompt_caches == 1 else k

    def _batched_hf(self, prompts, order, params, k, max_rows, ignore_eos, progress, streams):
        """model.generate, batch after batch (architectures the decoder does not drive); a batch samples
        from torch's stream seeded with seed + the stream index of its first prompt (one per batch)."""
        out: list = [None] * len(prompts)
        bs = max(1, max_rows // k)
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            if params.temperature > 0:
                torch.manual_seed(params.seed + streams[idx[0]])
            rows = self._cut(self._hf_generate_ids([prompts[i] for i in idx for _ in range(k)], params,
                                                   ignore_eos).tolist(), ignore_eos)
            for j, i in enumerate(idx):
                out[i] = rows[j * k:(j + 1) * k]
            if progress is not None:
                progress(len(idx))
        return out

    def generate(self, prompts: list[str], params: SamplingParams, progress=None) -> list[list[str]]:
        ids = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        gens = self.generate_ids(ids, params, progress=progress)
        # stop strings are cut afterwards (same text as hf/vllm, which stop early; rows decode to the end)
        return [[cut_at_stop(self.tok.decode(g, skip_special_tokens=True), params.stop) for g in per]
                for per in gens]
