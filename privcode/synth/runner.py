"""One batch shape of the fast backend: static buffers, the decode step (captured as CUDA graphs) and
the slot-level operations continuous batching needs (`Runner`).

    r = Runner(Decoder(model), B=8, S=128, temperature=0.8, top_p=0.95, eos=2, pad=0, ignore_eos=False,
               use_graph=True, reps=2, prefix=64)
    r.begin(seed=0)
    r.load([0], [[5, 6, 7]])                       # prompt -> holder 0 (its K/V, its last hidden state)
    r.start([0, 1], [0, 0], ids=[0, 1], plens=[3, 3], lims=[16, 16], max_new=16)  # rows 0, 1: its samples 0, 1
    r.replay(r.att_len(0))
    fin, cnt = r.poll()
    tokens = r.harvest([0, 1], cnt[:2])

Every row decodes its own sequence at its own pace: its write slot, position, token count, token
limit and counter base (its random stream, `sampling.row_exponential`) are per-row buffers, so a
finished row is given a new sequence between two steps (`load` + `start`, eager writes into the
same buffers) without changing any captured shape. Finished rows freeze (slot, position and count
stop) until they are started again. privcode.synth.batching decides what each row decodes.
"""
from __future__ import annotations

import logging

import torch

from privcode.synth.decoder import SLOT_BUCKET, Decoder, bucket
from privcode.synth.sampling import row_exponential, row_keys, seed_key, top_p_sample

log = logging.getLogger(__name__)

PREFILL_TOKENS = 16384  # prompts per prefill chunk = this // prompt length (bounds prefill memory)


class Runner:
    """Buffers of one (rows B, cache length S, sampling mode) and its captured decode steps.
    With a prompt cache (`prefix` > 0 slots) each group of `reps` consecutive rows has `caches`
    holders (group u: holders u * caches + s), each keeping one prompt's K/V for the group's rows (a row
    reads the one `start` gave it: with 2 or more, freed rows start the next prompt while others finish
    the last one), and a row's own cache holds its S generated slots only;
    without one (reps 1) each row is its own holder: its cache holds its prompt in slots [0, len)
    and its generated tokens after. fused_sampler (default: on CUDA): the sampler and its noise under
    torch.compile (one shape [B, vocab]; the first tokens of started rows are padded to it)."""

    @torch.inference_mode()
    def __init__(self, dec: Decoder, B: int, S: int, *, temperature: float, top_p: float, eos, pad: int,
                 ignore_eos: bool, use_graph: bool, sampler=top_p_sample, reps: int = 1, prefix: int = 0,
                 fused_sampler: bool | None = None, caches: int = 1):
        p = next(dec.model.parameters())
        dev, dt = p.device, p.dtype
        self.dec, self.B, self.S, self.dev, self.reps = dec, B, S, dev, reps
        self.prefix, self.caches = None, caches if prefix > 0 else 1
        if prefix > 0:
            assert B % reps == 0 and caches >= 1
            H = B // reps * caches
            pshp = (H, dec.kv, prefix, dec.hd)
            self.prefix = ([torch.zeros(pshp, device=dev, dtype=dt) for _ in dec.layers],
                           [torch.zeros(pshp, device=dev, dtype=dt) for _ in dec.layers],
                           torch.zeros((H, prefix), dtype=torch.bool, device=dev), reps,
                           torch.zeros(B, dtype=torch.long, device=dev) if caches > 1 else None)
        else:
            assert reps == 1
        self.temperature, self.top_p, self.sampler = temperature, top_p, sampler
        self.eos = None if (eos is None or ignore_eos) else int(eos)
        self.pad = int(pad)
        shp = (B, dec.kv, S, dec.hd)
        self.K = [torch.zeros(shp, device=dev, dtype=dt) for _ in dec.layers]
        self.V = [torch.zeros(shp, device=dev, dtype=dt) for _ in dec.layers]
        z = lambda: torch.zeros(B, dtype=torch.long, device=dev)  # noqa: E731
        self.tok, self.pos, self.slot, self.cnt, self.lim, self.base = z(), z(), z(), z(), z(), z()
        self.seed = torch.zeros(1, dtype=torch.long, device=dev)  # seed_key of the run (a buffer: graphs read it)
        self.valid = torch.zeros((B, S), dtype=torch.bool, device=dev)
        self.fin = torch.ones(B, dtype=torch.bool, device=dev)
        self.out = torch.full((B, S + 1), self.pad, dtype=torch.long, device=dev)  # column S: finished rows' bin
        holders = B // reps * self.caches if self.prefix else B
        self.hlast = torch.zeros((holders, dec.model.config.hidden_size), device=dev, dtype=dt)
        self.draw, self.fused = self._draw, False
        if (dev.type == "cuda" if fused_sampler is None else fused_sampler) and temperature > 0:
            try:  # noise, softmax and the race in fused kernels instead of ~30 passes over [B, vocab]
                fused = torch.compile(self._draw, dynamic=False)
                fused(torch.zeros((B, dec.head.weight.shape[0]), device=dev, dtype=dt), self.base)  # compiles now
                self.draw, self.fused = fused, True
            except Exception as e:  # noqa: BLE001 - no compiler: the same draws, eagerly
                log.warning("compiling the sampler failed (%s); sampling eagerly", e)
        self.graphs = {}  # attention length -> the captured decode step (CUDA)
        self.begin(0)
        if use_graph and dev.type == "cuda":
            self._capture_or_fall_back()
            self.begin(0)

    def _capture_or_fall_back(self):
        """Capture the decode steps; if that fails with the compiled sampler, again with the eager one;
        if it fails still, decode eagerly (each fallback logged)."""
        for attempt in ("compiled sampler", "eager sampler"):
            try:
                self._capture()
                return
            except Exception as e:  # noqa: BLE001 - any capture failure: a plainer step, then no graphs
                self.graphs = {}
                torch.cuda.synchronize(self.dev)
                if attempt == "compiled sampler" and self.fused:
                    log.warning("CUDA graph capture with the compiled sampler failed (%s); sampling eagerly", e)
                    self.draw, self.fused = self._draw, False
                    continue
                log.warning("CUDA graph capture failed (%s); decoding eagerly", e)
                return

    def choose(self, logits, counters):
        """The next token of each row: greedy, or the sampler with each row's own noise (`counters`:
        counter base + token index)."""
        if self.temperature <= 0:
            return logits.argmax(-1)
        b = counters.shape[0]
        if self.fused and b != self.B:  # the compiled sampler: one shape [B, vocab]
            counters = torch.cat([counters, counters.new_zeros(self.B - b)])
            logits = torch.cat([logits, logits.new_zeros((self.B - b, logits.shape[1]))])
        return self.draw(logits, counters)[:b]

    def _draw(self, logits, counters):
        """The sampler's tokens for `logits` [rows, vocab] with the rows' noise `row_exponential(counters)`."""
        noise = row_exponential(counters, self.seed, logits.shape[-1])
        return self.sampler(logits, self.temperature, self.top_p, noise=noise)

    def att_len(self, slot: int) -> int:
        """Cache slots a step whose highest write is `slot` attends to: the written ones, rounded up to
        SLOT_BUCKET (one graph per length)."""
        return min(self.S, bucket(slot + 1))

    def step(self, att=None):
        """One decode step of every row (idle and finished rows compute too; their tokens are binned)."""
        att = att or self.S
        mark = self.dec.mark
        with mark("bookkeeping"):
            self.valid.scatter_(1, self.slot[:, None], True)
        h = self.dec.forward(self.tok[:, None], self.pos[:, None], self.slot, self.K, self.V,
                             self.valid[:, None, None, :att], prefix=self.prefix, att=att)
        with mark("head"):
            logits = self.dec.head(h)
        with mark("sampling" if self.temperature > 0 else "argmax"):
            nxt = self.choose(logits, self.base + self.cnt)
        with mark("bookkeeping"):
            self._advance(nxt)

    def _advance(self, nxt):
        """Store each live row's new token and move its slot, position and count; finish rows at EOS or
        their limit."""
        live = ~self.fin
        self.out.scatter_(1, torch.where(live, self.cnt, self.S)[:, None], nxt[:, None])
        if self.eos is not None:
            self.fin |= nxt == self.eos
        adv = live.long()
        self.cnt += adv
        self.pos += adv
        self.slot += adv
        self.fin |= self.cnt >= self.lim
        self.tok.copy_(nxt)

    @torch.inference_mode()
    def replay(self, att: int):
        """One decode step reading `att` cache slots: its graph, or eagerly."""
        if self.graphs:
            self.graphs[att].replay()
        else:
            self.step(att)

    def _capture(self):
        """One graph per attention length, all before the first run (warm-up steps move the state,
        which `begin` resets); they share one memory pool (only one replays at a time)."""
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
    def begin(self, seed: int):
        """Every row idle (finished, nothing to harvest); `seed` for the rows started next. Idle rows
        attend to one zero slot, so every row stays finite."""
        self.fin.fill_(True)
        for t in (self.tok, self.pos, self.slot, self.cnt, self.lim, self.base):
            t.zero_()
        self.seed.fill_(seed_key(seed))
        self.valid.zero_()
        self.valid[:, 0] = True
        if self.prefix is not None:
            self.prefix[2].zero_()
            self.prefix[2][:, 0] = True
            if self.prefix[4] is not None:
                self.prefix[4].zero_()

    @torch.inference_mode()
    def load(self, holders: list[int], prompts: list[list[int]]):
        """Prefill `prompts` (token lists) into `holders` (prompt-cache rows, or own rows without a
        prompt cache): their K/V in slots [0, len), their valid slots, their last hidden states.
        Right-padded in chunks of PREFILL_TOKENS; pad queries attend to the real keys (finite, unused)."""
        shared = self.prefix is not None
        Kc, Vc = (self.prefix[0], self.prefix[1]) if shared else (self.K, self.V)
        valid = self.prefix[2] if shared else self.valid
        n = torch.tensor([len(x) for x in prompts], device=self.dev)
        hold = torch.tensor(holders, device=self.dev)
        step = max(1, PREFILL_TOKENS // max(len(x) for x in prompts))
        for c in range(0, len(prompts), step):
            part, nr = prompts[c:c + step], n[c:c + step]
            P = max(len(x) for x in part)
            ids = torch.tensor([list(x) + [self.pad] * (P - len(x)) for x in part], device=self.dev)
            ar = torch.arange(P, device=self.dev)
            key_ok = ar[None, :] < nr[:, None]                                           # [u, P]
            mask = ((ar[None, :] <= ar[:, None])[None] & key_ok[:, None, :])[:, None]    # causal, real keys
            h = self.dec.forward(ids, ar.expand(len(part), P), None, Kc, Vc, mask, rows=hold[c:c + step],
                                 last=nr - 1)
            self.hlast[hold[c:c + step]] = h.to(self.hlast.dtype)
            valid[hold[c:c + step]] = torch.arange(valid.shape[1], device=self.dev)[None, :] < nr[:, None]

    @torch.inference_mode()
    def start(self, rows: list[int], holders: list[int], ids: list[int], plens: list[int], lims: list[int],
              max_new: int):
        """Rows `rows` start decoding the prompt in `holders` (loaded): identity `ids` (prompt index
        * n + sample index: the random stream), prompt lengths `plens`, at most `lims` new tokens
        (counter bases from `max_new`). Their first token is chosen here from the holder's last
        hidden state."""
        r = torch.tensor(rows, device=self.dev)
        plen = torch.tensor(plens, device=self.dev)
        base = row_keys(torch.tensor(ids, device=self.dev), max_new)
        nxt = self.choose(self.dec.head(self.hlast[torch.tensor(holders, device=self.dev)]), base)
        lim = torch.tensor(lims, device=self.dev)
        self.base[r], self.lim[r], self.tok[r], self.pos[r] = base, lim, nxt, plen
        self.out[r, 0] = nxt
        self.cnt[r] = 1
        fin = lim <= 1
        if self.eos is not None:
            fin |= nxt == self.eos
        self.fin[r] = fin
        if self.prefix is not None:  # own cache: generated slots only, from slot 0
            if self.prefix[4] is not None:  # which of its group's prompt caches the row reads
                self.prefix[4][r] = torch.tensor(holders, device=self.dev) % self.caches
            self.slot[r] = 0
            self.valid[r] = False
        else:                        # after the prompt, which `load` wrote into this row
            self.slot[r] = plen
            self.valid[r] = torch.arange(self.S, device=self.dev)[None, :] < plen[:, None]

    def poll(self):
        """(finished, token count) of every row, on the host (one device sync)."""
        fin, cnt = torch.stack([self.fin.long(), self.cnt]).tolist()
        return [bool(f) for f in fin], cnt

    def harvest(self, rows: list[int], counts: list[int]) -> list[list[int]]:
        """The tokens of finished `rows` (their `counts` from `poll`)."""
        got = self.out[torch.tensor(rows, device=self.dev), :max(counts)].tolist()
        return [g[:c] for g, c in zip(got, counts)]
