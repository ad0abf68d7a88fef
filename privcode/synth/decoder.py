"""The fast backend's model driver: the model's own layers run with an explicit static KV cache
(`Decoder`): prefill of prompts into chosen cache rows, one decode step with a per-row write slot.
privcode.synth.runner holds one batch shape's buffers and captured steps, privcode.synth.batching
decides what each row decodes; privcode.synth.fast explains the design and is the interface."""
from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED = {"llama", "qwen2", "qwen3", "mistral"}
SLOT_BUCKET = 64        # cache length rounded up to this, so graphs are reused across batches


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
        # compile_layers: the two halves of a decode layer around its attention -- norm, q/k/v and rotary
        # before it; o_proj, residuals and MLP after it -- as functions of the layer's module and tensors:
        # every layer and every attention length has the same shapes there, so torch.compile makes one
        # graph for each half (regional compilation) and fuses the element-wise work between the GEMMs.
        # The attention stays eager: it reads a slice of the cache whose length changes with the step,
        # and a compiled SDPA would copy that slice to a contiguous buffer every step.
        self.decode_layer = self._decode_layer
        self.qkv, self.finish_layer = self._qkv, self._finish_layer
        if compile_layers:
            import torch._dynamo

            # one specialization per (batch, prefill length) shape: room for a job's few of them
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.qkv = torch.compile(self._qkv, dynamic=False)
            self.finish_layer = torch.compile(self._finish_layer, dynamic=False)
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

    def forward(self, ids, pos, slots, K, V, mask, rows=None, prefix=None, att=None, last=None):
        """ids, pos [b, L]; K/V per layer [B, kv, S, d]; mask [b, 1, L, S_att] bool (True: attend).
        Decode (rows None, L == 1, b == B): each row writes its new K/V at its own slot `slots` [B] and its query
        attends to the first `att` slots of its cache (the mask is [B, 1, 1, att]: slots past the
        last written one are never read); prefix: (Kp, Vp, pvalid, reps), a prompt cache
        [B / reps, kv, P, d] per layer shared by `reps` consecutive rows, attended to first.
        Prefill (rows [b] given): the L tokens' K/V go to slots [0, L) of cache rows `rows` [b] and the
        queries attend to the L new tokens only (`slots` is unused).
        Returns final-norm hidden states [b, H] of the last position (`last` [b]: of these positions)."""
        b, L = ids.shape
        h = self.embed(ids)
        cos, sin = self.rotary(h, pos)
        cos, sin = cos[:, None], sin[:, None]
        decode = rows is None
        idx = slots.view(b, 1, 1, 1).expand(b, self.kv, 1, self.hd) if decode else None
        for i, layer in enumerate(self.layers):
            if decode:
                pre = (prefix[0][i], prefix[1][i], prefix[2]) if prefix is not None else None
                h = self.decode_layer(layer, h, cos, sin, idx, K[i], V[i], mask, pre, prefix[3] if prefix else 1,
                                      att or K[i].shape[2])
                continue
            q, k, v = self._qkv(layer, h, cos, sin, b, L)
            K[i][rows, :, :L] = k.to(K[i].dtype)
            V[i][rows, :, :L] = v.to(V[i].dtype)
            G = self.nh // self.kv
            kk = k.repeat_interleave(G, dim=1) if G > 1 else k
            vv = v.repeat_interleave(G, dim=1) if G > 1 else v
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=self.scaling)
            h = self._finish_layer(layer, h, o.transpose(1, 2).reshape(b, L, self.nh * self.hd))
        return self.norm(h[:, -1] if last is None else h[torch.arange(b, device=h.device), last])

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

    def _decode_layer(self, layer, h, cos, sin, idx, Ki, Vi, mask, pre, reps: int, att: int):
        """One layer for one new token per row: writes its K/V into the row caches Ki/Vi at the
        row's slot (`idx`: the slots expanded to [B, kv, 1, d]), attends to their first `att` slots
        (after the shared prompt cache `pre` = (Kp, Vp, pvalid), when given) and returns the
        layer's output hidden states."""
        b = h.shape[0]
        G = self.nh // self.kv
        q, k, v = self.qkv(layer, h, cos, sin, b, 1)
        Ki.scatter_(2, idx, k.to(Ki.dtype))
        Vi.scatter_(2, idx, v.to(Vi.dtype))
        Ki, Vi = Ki[:, :, :att], Vi[:, :, :att]
        if pre is not None:
            o = self._shared(q.reshape(b, self.kv, G, self.hd), Ki, Vi, mask, pre[0], pre[1], pre[2], reps)
        else:  # [b, kv, G, d] queries against [b, kv, S, d]: no K/V repeat
            o = F.scaled_dot_product_attention(q.reshape(b, self.kv, G, self.hd), Ki, Vi, attn_mask=mask,
                                               scale=self.scaling)
        return self.finish_layer(layer, h, o.reshape(b, 1, self.nh * self.hd))

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


