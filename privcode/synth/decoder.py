"""The fast backend's decoding engine: the model's own layers driven with an explicit static KV
cache (`Decoder`), and one batch shape's buffers and captured decode steps (`Runner`).
privcode.synth.fast explains the design and is the interface (FastHFBackend)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from privcode.synth.sampling import top_p_sample

log = logging.getLogger(__name__)

SUPPORTED = {"llama", "qwen2", "qwen3", "mistral"}
PREFILL_TOKENS = 16384  # rows per prefill chunk = this // prompt length (bounds prefill memory)
SLOT_BUCKET = 64        # cache length rounded up to this, so graphs are reused across batches
CHECK_EVERY = 32        # decode steps between "all finished?" checks (each one is a host sync)


def bucket(n: int) -> int:
    """`n` cache slots rounded up to SLOT_BUCKET."""
    return -(-n // SLOT_BUCKET) * SLOT_BUCKET


def _rot(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Decoder:
    """The model's own modules, driven with an explicit static cache."""

    def __init__(self, model, compile_layers: bool = False):
        self.model = model
        # one decode layer (L == 1) as a function of the layer's module and tensors: every layer
        # has the same shapes, so torch.compile makes one graph for all of them (regional
        # compilation) and fuses the element-wise work between the GEMMs
        self.decode_layer = self._decode_layer
        if compile_layers:
            import torch._dynamo

            # one specialization per (batch, cache length) bucket, a few per job: room for all of them
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.decode_layer = torch.compile(self._decode_layer, dynamic=False)
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

    def forward(self, ids, pos, slots, K, V, mask, rows=slice(None), prefix=None, att=None):
        """ids, pos [b, L]; slots [L] cache slots written; K/V per layer [B, kv, S, d] (rows: which
        cache rows these b sequences are); mask [b, 1, L, S_att] bool (True: attend). With L == 1
        the query attends to the whole cache; with L > 1 (prefill) to the L new tokens only.
        prefix (L == 1): (Kp, Vp, pvalid, reps), a prompt cache [b / reps, kv, P, d] per layer shared
        by `reps` consecutive rows, attended to before each row's own cache K/V.
        att (L == 1): the new query reads only the first `att` slots of each row's cache (the mask is
        [b, 1, 1, att]): slots past the last written one are never read.
        Returns final-norm hidden states of the last position [b, H]."""
        b, L = ids.shape
        h = self.embed(ids)
        cos, sin = self.rotary(h, pos)
        cos, sin = cos[:, None], sin[:, None]
        for i, layer in enumerate(self.layers):
            Ki, Vi = K[i][rows], V[i][rows]
            if L == 1:
                pre = (prefix[0][i], prefix[1][i], prefix[2]) if prefix is not None else None
                h = self.decode_layer(layer, h, cos, sin, slots, Ki, Vi, mask, pre, prefix[3] if prefix else 1,
                                      att or Ki.shape[2])
                continue
            q, k, v = self._qkv(layer, h, cos, sin, b, L)
            Ki.index_copy_(2, slots, k.to(Ki.dtype))
            Vi.index_copy_(2, slots, v.to(Vi.dtype))
            G = self.nh // self.kv
            kk = k.repeat_interleave(G, dim=1) if G > 1 else k
            vv = v.repeat_interleave(G, dim=1) if G > 1 else v
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=self.scaling)
            h = self._finish_layer(layer, h, o.transpose(1, 2).reshape(b, L, self.nh * self.hd))
        return self.norm(h[:, -1])

    def _qkv(self, layer, h, cos, sin, b, L):
        """The layer's rotated queries [b, nh, L, d] and keys, values [b, kv, L, d]."""
        at = layer.self_attn
        x = layer.input_layernorm(h)
        q = at.q_proj(x).view(b, L, self.nh, self.hd)
        k = at.k_proj(x).view(b, L, self.kv, self.hd)
        v = at.v_proj(x).view(b, L, self.kv, self.hd)
        if hasattr(at, "q_norm"):
            q, k = at.q_norm(q), at.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return q * cos + _rot(q) * sin, k * cos + _rot(k) * sin, v

    @staticmethod
    def _finish_layer(layer, h, o):
        h = h + layer.self_attn.o_proj(o)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _decode_layer(self, layer, h, cos, sin, slots, Ki, Vi, mask, pre, reps: int, att: int):
        """One layer for one new token per row: writes its K/V into the row caches Ki/Vi at `slots`,
        attends to their first `att` slots (after the shared prompt cache `pre` = (Kp, Vp, pvalid),
        when given) and returns the layer's output hidden states."""
        b = h.shape[0]
        G = self.nh // self.kv
        q, k, v = self._qkv(layer, h, cos, sin, b, 1)
        Ki.index_copy_(2, slots, k.to(Ki.dtype))
        Vi.index_copy_(2, slots, v.to(Vi.dtype))
        Ki, Vi = Ki[:, :, :att], Vi[:, :, :att]
        if pre is not None:
            o = self._shared(q.reshape(b, self.kv, G, self.hd), Ki, Vi, mask, pre[0], pre[1], pre[2], reps)
        else:  # [b, kv, G, d] queries against [b, kv, S, d]: no K/V repeat
            o = F.scaled_dot_product_attention(q.reshape(b, self.kv, G, self.hd), Ki, Vi, attn_mask=mask,
                                               scale=self.scaling)
        return self._finish_layer(layer, h, o.reshape(b, 1, self.nh * self.hd))

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


class Runner:
    """Static buffers of one (batch, cache length, sampling mode) and its captured decode step.
    With reps > 1 (n samples per prompt) each prompt's K/V live once in a prompt cache of `prefix`
    slots shared by its reps rows, and the per-row cache holds the S generated slots only."""

    @torch.inference_mode()
    def __init__(self, dec: Decoder, B: int, S: int, *, temperature: float, top_p: float, eos, pad: int,
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
        self.graphs = {}  # attention length -> the captured decode step (CUDA)
        if use_graph and dev.type == "cuda":
            try:
                self._capture()
            except Exception as e:  # noqa: BLE001 - any capture failure: decode eagerly instead
                log.warning("CUDA graph capture failed (%s); decoding eagerly", e)
                self.graphs = {}
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

    def att_len(self, slot: int) -> int:
        """Cache slots a step that writes `slot` attends to: the written ones, rounded up to SLOT_BUCKET
        (one graph per length)."""
        return min(self.S, bucket(slot + 1))

    def step(self, att=None):
        att = att or self.S
        self.valid.index_fill_(1, self.slot, True)
        h = self.dec.forward(self.tok[:, None], self.pos[:, None], self.slot, self.K, self.V,
                             self.valid[:, None, None, :att], prefix=self.prefix, att=att)
        nxt = self.after_choice(self.choose(self.dec.head(h)))
        self.out.index_copy_(1, self.t, nxt[:, None])
        self.tok.copy_(nxt)
        self.pos += 1
        self.slot += 1
        self.t += 1

    def _capture(self):
        """One graph per attention length, all before the first run (warm-up steps move the state,
        which `run` resets); they share one memory pool (only one replays at a time)."""
        pool = None
        for att in range(SLOT_BUCKET, self.S + SLOT_BUCKET, SLOT_BUCKET):
            att = min(att, self.S)
            s = torch.cuda.Stream(self.dev)
            s.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(s):
                for _ in range(2):
                    self.step(att)
            torch.cuda.current_stream(self.dev).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.step(att)
            pool = pool or g.pool()
            self.graphs[att] = g

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
        first = 0 if shared else P  # the slot decode step 1 writes
        for j in range(1, max_new):
            att = self.att_len(first + j - 1)
            if self.graphs:
                self.graphs[att].replay()
            else:
                self.step(att)
            if self.eos is not None and j % CHECK_EVERY == 0 and bool(self.finished[:b].all()):
                break
        return self.out[:b, :max_new].cpu()
