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
  heads are folded into the query axis so no K/V is repeated;
- with `n` samples per prompt each prompt is prefilled once and its K/V kept once, in a prompt
  cache that its n rows' queries read together; each row's own cache holds its generated slots;
- top-p sampling does not sort the vocabulary (`top_p_sample`: an exponential race, exact but
  for an event of probability <= 1e-12 per token, where it takes the most probable token).

Supported: decoder-only models whose layers look like Llama/Qwen2/Qwen3/Mistral
(input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp) with full attention.
Anything else (or a failed capture) falls back to HFBackend / eager decoding. On CPU the same
decode step runs eagerly (no graphs).
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F

from privcode.synth.base import Backend, SamplingParams, cut_at_stop

log = logging.getLogger(__name__)

SUPPORTED = {"llama", "qwen2", "qwen3", "mistral"}
PREFILL_TOKENS = 16384  # rows per prefill chunk = this // prompt length (bounds prefill memory)
SLOT_BUCKET = 64        # cache length rounded up to this, so graphs are reused across batches
CHECK_EVERY = 32        # decode steps between "all finished?" checks (each one is a host sync)
TOP_P_MISS = 1e-12      # top-p sampling may fall back to the most probable token with at most this probability


def sort_top_p_sample(logits, temperature: float, top_p: float):
    """The reference sampler: sort the vocabulary, mask everything after the smallest prefix whose
    mass reaches top_p, draw from the rest (argmax of p / E, E ~ Exp(1): the exponential race)."""
    z = logits.float() / temperature
    if top_p < 1.0:
        zs, idx = z.sort(dim=-1, descending=True)
        ps = zs.softmax(-1)
        drop = (ps.cumsum(-1) - ps) >= top_p  # keep the smallest prefix reaching top_p
        drop[:, 0] = False
        z = z.scatter(-1, idx, zs.masked_fill(drop, float("-inf")))
    probs = z.softmax(-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def top_p_candidates(top_p: float, miss: float = TOP_P_MISS) -> int:
    """How many earliest arrivals `top_p_sample` tests so that all miss the nucleus w.p. <= miss."""
    return 1 if top_p >= 1.0 else max(1, math.ceil(math.log(miss) / math.log1p(-top_p)))


def top_p_sample(logits, temperature: float, top_p: float, candidates: int | None = None):
    """A draw from softmax(logits / temperature) restricted to its top-p nucleus, without a sort.

    Token k "arrives" at E_k / p_k (E_k ~ Exp(1), the same stream as `sort_top_p_sample`); the first
    arrival within any set is distributed as p restricted to that set, so the draw is the earliest
    arrival inside the nucleus. A token is in the nucleus iff the mass of strictly more probable
    tokens is < top_p. Only the `candidates` earliest arrivals are tested (a binary search over them,
    one masked sum over the vocabulary per step); given that the earlier ones missed, each misses with
    probability <= 1 - top_p, so the draw is exact but for an event of probability
    <= (1 - top_p)^candidates (default: enough candidates for TOP_P_MISS), where the most probable
    token (always in the nucleus) is taken.
    Same tokens as the reference for the same random stream, except at exact probability ties or
    a boundary mass within float rounding of top_p."""
    p = (logits.float() / temperature).softmax(-1)
    key = p / torch.empty_like(p).exponential_()
    if top_p >= 1.0:
        return key.argmax(-1)
    m = min(candidates or top_p_candidates(top_p), p.shape[-1])
    cand = key.topk(m, dim=-1).indices                      # [B, m], earliest arrival first
    pc = p.gather(-1, cand)
    v = pc.sort(-1).values                                  # candidate probabilities, ascending
    # inside(v_i) = (mass of tokens with p > v_i) < top_p is monotone in i: binary-search the first
    # inside candidate, one masked sum over the vocabulary per step (no sort, no atomics)
    lo = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
    hi = torch.full_like(lo, m)                             # m: no candidate inside
    for _ in range(math.ceil(math.log2(m + 1))):
        mid = (lo + hi) // 2
        t = v.gather(-1, mid.clamp(max=m - 1)[:, None])
        ok = torch.where(p > t, p, 0.0).sum(-1) < top_p
        act = lo < hi
        hi = torch.where(act & ok, mid, hi)
        lo = torch.where(act & ~ok, mid + 1, lo)
    inside = (pc >= v.gather(-1, lo.clamp(max=m - 1)[:, None])) & (lo < m)[:, None]
    first = inside.to(torch.int32).argmax(-1, keepdim=True)  # the earliest candidate inside
    pick = cand.gather(-1, first)[:, 0]
    return torch.where(inside.any(-1), pick, p.argmax(-1))


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

    def forward(self, ids, pos, slots, K, V, mask, rows=slice(None), prefix=None):
        """ids, pos [b, L]; slots [L] cache slots written; K/V per layer [B, kv, S, d] (rows: which
        cache rows these b sequences are); mask [b, 1, L, S_att] bool (True: attend). With L == 1
        the query attends to the whole cache; with L > 1 (prefill) to the L new tokens only.
        prefix (L == 1): (Kp, Vp, pvalid, reps), a prompt cache [b / reps, kv, P, d] per layer shared
        by `reps` consecutive rows, attended to before each row's own cache K/V.
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
            if L == 1 and prefix is not None:
                Kp, Vp, pvalid, reps = prefix
                o = self._shared(q.reshape(b, self.kv, G, self.hd), Ki, Vi, mask, Kp[i], Vp[i], pvalid, reps)
                o = o.reshape(b, 1, self.nh * self.hd)
            elif L == 1:  # [b, kv, G, d] queries against [b, kv, S, d]: no K/V repeat
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

    def _shared(self, q, Ks, Vs, smask, Kp, Vp, pvalid, reps):
        """Attention of q [B, kv, G, d] over a prompt cache shared by `reps` consecutive rows (read
        once for all of them: their queries are stacked) and each row's own cache; one softmax."""
        B, kv, G, d = q.shape
        U, P = Kp.shape[0], Kp.shape[2]
        qf = q.view(U, reps, kv, G, d).transpose(1, 2).reshape(U, kv, reps * G, d)
        s1 = torch.matmul(qf, Kp.transpose(-1, -2)).float().masked_fill(~pvalid[:, None, None, :], float("-inf"))
        s1 = s1.view(U, kv, reps, G, P).transpose(1, 2).reshape(B, kv, G, P)
        s2 = torch.matmul(q, Ks.transpose(-1, -2)).float().masked_fill(~smask, float("-inf"))
        w = (torch.cat([s1, s2], -1) * self.scaling).softmax(-1).to(q.dtype)
        w1 = w[..., :P].reshape(U, reps, kv, G, P).transpose(1, 2).reshape(U, kv, reps * G, P)
        o1 = torch.matmul(w1, Vp).view(U, kv, reps, G, d).transpose(1, 2).reshape(B, kv, G, d)
        return o1 + torch.matmul(w[..., P:], Vs)


class _Runner:
    """Static buffers of one (batch, cache length, sampling mode) and its captured decode step.
    With reps > 1 (n samples per prompt) each prompt's K/V live once in a prompt cache of `prefix`
    slots shared by its reps rows, and the per-row cache holds the S generated slots only."""

    @torch.inference_mode()
    def __init__(self, dec: _Decoder, B: int, S: int, *, temperature: float, top_p: float, eos, pad: int,
                 ignore_eos: bool, use_graph: bool, sampler=top_p_sample, reps: int = 1, prefix: int = 0):
        p = next(dec.model.parameters())
        dev, dt = p.device, p.dtype
        self.dec, self.B, self.S, self.dev, self.reps = dec, B, S, dev, reps
        self.prefix = None
        if reps > 1:
            assert B % reps == 0 and prefix > 0
            pshp = (B // reps, dec.kv, prefix, dec.hd)
            self.prefix = ([torch.zeros(pshp, device=dev, dtype=dt) for _ in dec.layers],
                           [torch.zeros(pshp, device=dev, dtype=dt) for _ in dec.layers],
                           torch.zeros((B // reps, prefix), dtype=torch.bool, device=dev), reps)
        self.temperature, self.top_p, self.sampler = temperature, top_p, sampler
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
        return self.sampler(logits, self.temperature, self.top_p)

    def after_choice(self, nxt):
        if self.eos is not None:
            nxt = torch.where(self.finished, torch.full_like(nxt, self.pad), nxt)
            self.finished |= nxt == self.eos
        return nxt

    def step(self):
        self.valid.index_fill_(1, self.slot, True)
        h = self.dec.forward(self.tok[:, None], self.pos[:, None], self.slot, self.K, self.V,
                             self.valid[:, None, None, :], prefix=self.prefix)
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
        """ids [u, P] left-padded prompts, n_real [u] their lengths; each prompt decodes `reps` rows
        (u * reps <= B) from one prefill. Returns [u * reps, max_new] tokens, prompt 0's rows first."""
        u, P = ids.shape
        reps, b = self.reps, u * self.reps
        shared = self.prefix is not None
        assert b <= self.B and (P <= self.prefix[0][0].shape[2] and max_new <= self.S if shared
                                else P + max_new - 1 <= self.S)
        ids, n_real = ids.to(self.dev), n_real.to(self.dev)
        src = torch.arange(self.B, device=self.dev) // reps  # row -> the prompt it decodes
        src[b:] = 0                                          # spare graph rows: copies of prompt 0, dropped
        pad_len = P - n_real
        ar = torch.arange(P, device=self.dev)
        key_ok = ar[None, :] >= pad_len[:, None]                                     # [u, P]
        self.valid.zero_()
        if shared:
            Kc, Vc, pvalid, _ = self.prefix
            pvalid.zero_()
            pvalid[:u, :P] = key_ok
        else:
            Kc, Vc = self.K, self.V
            self.valid[:, :P] = key_ok[src]
        self.finished.zero_()
        self.out.fill_(self.pad)
        # prefill each prompt once, in row chunks, into cache rows 0..u-1; pad queries attend to
        # themselves (finite, never read)
        causal = ar[None, :] <= ar[:, None]
        eye = torch.eye(P, dtype=torch.bool, device=self.dev)
        rows_per = max(1, PREFILL_TOKENS // P)
        hs = []
        for r0 in range(0, u, rows_per):
            r1 = min(u, r0 + rows_per)
            pos = (ar[None, :] - pad_len[r0:r1, None]).clamp(min=0)
            mask = ((causal[None] & key_ok[r0:r1, None, :]) | eye[None])[:, None]
            hs.append(self.dec.forward(ids[r0:r1], pos, ar, Kc, Vc, mask, rows=slice(r0, r1)))
        if not shared and b < self.B:  # spare rows: row 0's K/V (finite; their tokens are dropped)
            for K, V in zip(self.K, self.V):
                K[b:, :, :P] = K[:1, :, :P]
                V[b:, :, :P] = V[:1, :, :P]
        nxt = self.after_choice(self.choose(self.dec.head(torch.cat(hs))[src]))
        self.out[:, 0] = nxt
        self.tok.copy_(nxt)
        self.pos.copy_(n_real[src])
        self.slot.fill_(0 if shared else P)
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
                 cuda_graphs: bool = True, *, model=None, tokenizer=None, eos_token_id=None, pad_token_id=None,
                 sampler=top_p_sample, share_prefix: bool = True):
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
        self.dec = _Decoder(model) if _Decoder.supports(model) else None
        self._runners: OrderedDict = OrderedDict()
        self._fallback = None
        if self.dec is None:
            log.warning("FastHFBackend: %s is not a supported architecture; using model.generate",
                        getattr(model.config, "model_type", type(model).__name__))

    @property
    def tokenizer(self):
        return self.tok

    def _runner(self, B, S, temperature, top_p, ignore_eos, reps=1, prefix=0) -> _Runner:
        key = (B, S, float(temperature), float(top_p), bool(ignore_eos), self.sampler, reps, prefix)
        if key in self._runners:
            self._runners.move_to_end(key)
            return self._runners[key]
        while len(self._runners) >= 2:  # bound cache memory: keep the two most recent shapes
            self._runners.popitem(last=False)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        r = _Runner(self.dec, B, S, temperature=temperature, top_p=top_p, eos=self.eos, pad=self.pad,
                    ignore_eos=ignore_eos, use_graph=self.cuda_graphs, sampler=self.sampler, reps=reps,
                    prefix=prefix)
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
                reps = k if self.share_prefix else 1
                uniq = batch[::reps]
                U = 1 << (len(uniq) - 1).bit_length()  # few distinct graph sizes
                U = len(uniq) if U * reps > max(self.batch_size, len(batch)) else U
                if reps > 1:  # a prompt cache of P (bucketed) slots + max_new generated slots per row
                    r = self._runner(U * reps, -(-params.max_new_tokens // SLOT_BUCKET) * SLOT_BUCKET,
                                     params.temperature, params.top_p, ignore_eos, reps,
                                     -(-P // SLOT_BUCKET) * SLOT_BUCKET)
                else:
                    r = self._runner(U, S, params.temperature, params.top_p, ignore_eos)
                ids = torch.tensor([[self.pad] * (P - len(x)) + x for x in uniq])
                gen = r.run(ids, torch.tensor([len(x) for x in uniq]), params.max_new_tokens)
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
        # stop strings are cut afterwards (same text as hf/vllm, which stop early; rows decode to the end)
        return [[cut_at_stop(self.tok.decode(g, skip_special_tokens=True), params.stop) for g in per]
                for per in gens]
