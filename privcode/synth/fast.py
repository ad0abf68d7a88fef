"""Fast transformers-weights backend: static KV cache, one CUDA graph per decode step.

    backend = FastHFBackend("results/models/smollm2/base", batch_size=256, dtype="bfloat16")
    backend.generate(prompts, SamplingParams(max_new_tokens=256))

Same interface and outputs as HFBackend (prompts sorted by length, left padding, greedy when
temperature == 0, otherwise temperature + top-p sampling with `n` samples per prompt, stop on
EOS per sequence), but decoding does not go through `model.generate`:

- prefill runs the model's own layers over the prompt once and writes K/V into a
  preallocated cache [batch, kv heads, slots, head dim] per layer;
- one decode step (embedding, layers, head, token choice, EOS bookkeeping, cache write, position
  advance) only touches fixed buffers, so on CUDA it is captured once as a CUDA graph and
  replayed: one launch per token instead of ~1000 kernel launches from Python;
- attention of the single new query reads the whole cache with a validity mask; grouped-query
  heads are folded into the query axis so no K/V is repeated.

Supported: decoder-only models whose layers look like Llama/Qwen2/Qwen3/Mistral
(input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp) with full attention.
Anything else (or a failed capture) falls back to HFBackend / eager decoding. On CPU the same
decode step runs eagerly (no graphs).
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F

from privcode.synth.base import Backend, SamplingParams

log = logging.getLogger(__name__)

SUPPORTED = {"llama", "qwen2", "qwen3", "mistral"}
PREFILL_TOKENS = 16384  # rows per prefill chunk = this // prompt length (bounds prefill memory)
SLOT_BUCKET = 64        # cache length rounded up to this, so graphs are reused across batches
CHECK_EVERY = 32        # decode steps between "all finished?" checks (each one is a host sync)


def _rot(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class _Decoder:
    """The model's own modules, driven with an explicit static cache."""

    def __init__(self, model):
        self.model = model
        m = model.get_decoder()
        self.embed, self.layers, self.norm, self.rotary = m.embed_tokens, m.layers, m.norm, m.rotary_emb
        self.head = model.get_output_embeddings()
        cfg = model.config
        a0 = self.layers[0].self_attn
        self.nh = cfg.num_attention_heads
        self.kv = getattr(cfg, "num_key_value_heads", None) or self.nh
        self.hd = getattr(a0, "head_dim", None) or cfg.hidden_size // self.nh
        self.scaling = getattr(a0, "scaling", self.hd ** -0.5)
        self.window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        lt = getattr(cfg, "layer_types", None)
        if lt is not None and all(t == "full_attention" for t in lt):
            self.window = None

    @staticmethod
    def supports(model) -> bool:
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED:
            return False
        try:
            m = model.get_decoder()
            L = m.layers[0]
            return all(hasattr(L, n) for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")) \
                and all(hasattr(L.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                and hasattr(m, "rotary_emb") and model.get_output_embeddings() is not None
        except (AttributeError, IndexError, TypeError):
            return False

    def forward(self, ids, pos, slots, K, V, mask, rows=slice(None)):
        """ids, pos [b, L]; slots [L] cache slots written; K/V per layer [B, kv, S, d] (rows: which
        cache rows these b sequences are); mask [b, 1, L, S_att] bool (True: attend). With L == 1
        the query attends to the whole cache; with L > 1 (prefill) to the L new tokens only.
        Returns final-norm hidden states of the last position [b, H]."""
        b, L = ids.shape
        h = self.embed(ids)
        cos, sin = self.rotary(h, pos)
        cos, sin = cos[:, None], sin[:, None]
        G = self.nh // self.kv
        for i, layer in enumerate(self.layers):
            at = layer.self_attn
            x = layer.input_layernorm(h)
            q = at.q_proj(x).view(b, L, self.nh, self.hd)
            k = at.k_proj(x).view(b, L, self.kv, self.hd)
            v = at.v_proj(x).view(b, L, self.kv, self.hd)
            if hasattr(at, "q_norm"):
                q, k = at.q_norm(q), at.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q = q * cos + _rot(q) * sin
            k = k * cos + _rot(k) * sin
            Ki, Vi = K[i][rows], V[i][rows]
            Ki.index_copy_(2, slots, k.to(Ki.dtype))
            Vi.index_copy_(2, slots, v.to(Vi.dtype))
            if L == 1:  # [b, kv, G, d] queries against [b, kv, S, d]: no K/V repeat
                o = F.scaled_dot_product_attention(q.reshape(b, self.kv, G, self.hd), Ki, Vi, attn_mask=mask,
                                                   scale=self.scaling)
                o = o.reshape(b, 1, self.nh * self.hd)
            else:
                kk = k.repeat_interleave(G, dim=1) if G > 1 else k
                vv = v.repeat_interleave(G, dim=1) if G > 1 else v
                o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=self.scaling)
                o = o.transpose(1, 2).reshape(b, L, self.nh * self.hd)
            h = h + at.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.norm(h[:, -1])


class _Runner:
    """Static buffers of one (batch, cache length, sampling mode) and its captured decode step."""

    @torch.inference_mode()
    def __init__(self, dec: _Decoder, B: int, S: int, *, temperature: float, top_p: float, eos, pad: int,
                 ignore_eos: bool, use_graph: bool):
        p = next(dec.model.parameters())
        dev, dt = p.device, p.dtype
        self.dec, self.B, self.S, self.dev = dec, B, S, dev
        self.temperature, self.top_p = temperature, top_p
        self.eos = None if (eos is None or ignore_eos) else int(eos)
        self.pad = int(pad)
        shp = (B, dec.kv, S, dec.hd)
        self.K = [torch.zeros(shp, device=dev, dtype=dt) for _ in dec.layers]
        self.V = [torch.zeros(shp, device=dev, dtype=dt) for _ in dec.layers]
        self.tok = torch.zeros(B, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.t = torch.zeros(1, dtype=torch.long, device=dev)
        self.valid = torch.zeros((B, S), dtype=torch.bool, device=dev)
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.out = torch.full((B, S), self.pad, dtype=torch.long, device=dev)
        self.graph = None
        if use_graph and dev.type == "cuda":
            try:
                self._capture()
            except Exception as e:  # noqa: BLE001 - any capture failure: decode eagerly instead
                log.warning("CUDA graph capture failed (%s); decoding eagerly", e)
                self.graph = None
                torch.cuda.synchronize(dev)

    def choose(self, logits):
        if self.temperature <= 0:
            return logits.argmax(-1)
        z = logits.float() / self.temperature
        if self.top_p < 1.0:
            zs, idx = z.sort(dim=-1, descending=True)
            ps = zs.softmax(-1)
            drop = (ps.cumsum(-1) - ps) >= self.top_p  # keep the smallest prefix reaching top_p
            drop[:, 0] = False
            z = z.scatter(-1, idx, zs.masked_fill(drop, float("-inf")))
        probs = z.softmax(-1)
        return (probs / torch.empty_like(probs).exponential_()).argmax(-1)  # = a draw from probs

    def after_choice(self, nxt):
        if self.eos is not None:
            nxt = torch.where(self.finished, torch.full_like(nxt, self.pad), nxt)
            self.finished |= nxt == self.eos
        return nxt

    def step(self):
        self.valid.index_fill_(1, self.slot, True)
        h = self.dec.forward(self.tok[:, None], self.pos[:, None], self.slot, self.K, self.V,
                             self.valid[:, None, None, :])
        nxt = self.after_choice(self.choose(self.dec.head(h)))
        self.out.index_copy_(1, self.t, nxt[:, None])
        self.tok.copy_(nxt)
        self.pos += 1
        self.slot += 1
        self.t += 1

    def _capture(self):
        s = torch.cuda.Stream(self.dev)
        s.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(s):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream(self.dev).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.step()
        self.graph = g

    @torch.inference_mode()
    def run(self, ids, n_real, max_new: int) -> torch.Tensor:
        """ids [b ≤ B, P] left-padded prompts, n_real [b] their lengths. Returns [b, max_new] tokens."""
        b, P = ids.shape
        assert b <= self.B and P + max_new - 1 <= self.S
        if b < self.B:  # fill the graph's batch with copies of row 0 (dropped afterwards)
            ids = torch.cat([ids, ids[:1].expand(self.B - b, P)])
            n_real = torch.cat([n_real, n_real[:1].expand(self.B - b)])
        ids, n_real = ids.to(self.dev), n_real.to(self.dev)
        pad_len = P - n_real
        ar = torch.arange(P, device=self.dev)
        key_ok = ar[None, :] >= pad_len[:, None]                                     # [B, P]
        self.valid.zero_()
        self.valid[:, :P] = key_ok
        self.finished.zero_()
        self.out.fill_(self.pad)
        # prefill, in row chunks; pad queries attend to themselves (finite, never read)
        causal = ar[None, :] <= ar[:, None]
        eye = torch.eye(P, dtype=torch.bool, device=self.dev)
        rows_per = max(1, PREFILL_TOKENS // P)
        first = torch.empty(self.B, dtype=torch.long, device=self.dev)
        for r0 in range(0, self.B, rows_per):
            r1 = min(self.B, r0 + rows_per)
            pos = (ar[None, :] - pad_len[r0:r1, None]).clamp(min=0)
            mask = ((causal[None] & key_ok[r0:r1, None, :]) | eye[None])[:, None]
            h = self.dec.forward(ids[r0:r1], pos, ar, self.K, self.V, mask, rows=slice(r0, r1))
            first[r0:r1] = self.choose(self.dec.head(h))
        nxt = self.after_choice(first)
        self.out[:, 0] = nxt
        self.tok.copy_(nxt)
        self.pos.copy_(n_real)
        self.slot.fill_(P)
        self.t.fill_(1)
        for j in range(1, max_new):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
            if self.eos is not None and j % CHECK_EVERY == 0 and bool(self.finished[:b].all()):
                break
        return self.out[:b, :max_new].cpu()


class FastHFBackend(Backend):
    name = "fast"

    def __init__(self, model_ref: str | None = None, batch_size: int = 64, dtype: str = "bfloat16",
                 cuda_graphs: bool = True, *, model=None, tokenizer=None, eos_token_id=None, pad_token_id=None):
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
        self.dec = _Decoder(model) if _Decoder.supports(model) else None
        self._runners: OrderedDict = OrderedDict()
        self._fallback = None
        if self.dec is None:
            log.warning("FastHFBackend: %s is not a supported architecture; using model.generate",
                        getattr(model.config, "model_type", type(model).__name__))

    @property
    def tokenizer(self):
        return self.tok

    def _runner(self, B, S, temperature, top_p, ignore_eos) -> _Runner:
        key = (B, S, float(temperature), float(top_p), bool(ignore_eos))
        if key in self._runners:
            self._runners.move_to_end(key)
            return self._runners[key]
        while len(self._runners) >= 2:  # bound cache memory: keep the two most recent shapes
            self._runners.popitem(last=False)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        r = _Runner(self.dec, B, S, temperature=temperature, top_p=top_p, eos=self.eos, pad=self.pad,
                    ignore_eos=ignore_eos, use_graph=self.cuda_graphs)
        self._runners[key] = r
        return r

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
                     ignore_eos: bool = False) -> list[list[list[int]]]:
        """Token-level generate: per prompt, `n` (1 when greedy) lists of new token ids, cut
        after EOS (kept whole with ignore_eos, for benchmarks on random weights)."""
        k = params.n if params.temperature > 0 else 1
        out: list = [None] * len(prompt_ids)
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        bs = max(1, self.batch_size // k)
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            batch = [list(prompt_ids[i]) or [self.pad] for i in idx for _ in range(k)]
            if params.temperature > 0:
                torch.manual_seed(params.seed + s)
            P = max(map(len, batch))
            S = -(-(P + params.max_new_tokens) // SLOT_BUCKET) * SLOT_BUCKET
            if self.dec is not None and (self.dec.window is None or S <= self.dec.window):
                B = 1 << (len(batch) - 1).bit_length()  # few distinct graph sizes
                B = len(batch) if B > max(self.batch_size, len(batch)) else B
                r = self._runner(B, S, params.temperature, params.top_p, ignore_eos)
                ids = torch.tensor([[self.pad] * (P - len(x)) + x for x in batch])
                gen = r.run(ids, torch.tensor([len(x) for x in batch]), params.max_new_tokens)
            else:
                gen = self._hf_generate_ids(batch, params, ignore_eos)
            rows = gen.tolist()
            if self.eos is not None and not ignore_eos:
                rows = [row[: row.index(self.eos) + 1] if self.eos in row else row for row in rows]
            for j, i in enumerate(idx):
                out[i] = rows[j * k:(j + 1) * k]
            if progress is not None:
                progress(len(idx))
        return out

    def generate(self, prompts: list[str], params: SamplingParams, progress=None) -> list[list[str]]:
        ids = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        gens = self.generate_ids(ids, params, progress=progress)
        return [[self.tok.decode(g, skip_special_tokens=True) for g in per] for per in gens]
