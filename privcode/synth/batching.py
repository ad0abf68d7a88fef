"""Continuous batching for the fast backend: which (prompt, sample) each row of a Runner decodes, and
when a finished row takes a waiting one.

    outs = decode(runner, prompt_ids, order, k=20, max_new=200, seed=0, continuous=True)
    outs[i][j]  # the tokens of sample j of prompt i in `order` (up to and with EOS, or max_new of them)

With a prompt cache (runner.prefix) the rows come in groups of `runner.reps`, each group with
`runner.caches` holders (prompt caches). A group decodes one prompt's k samples, a freed row starting the
prompt's next sample (no prefill); once they have all started, a freed row loads the next waiting prompt
into a holder no live row reads (one prefill) and starts its first sample. With one holder that is once all
the group's rows are free; with two, freed rows start the next prompt while the others finish the last one.
Once no prompt waits, a free group takes as many samples as it has rows from the group with the most samples
not yet started (one more prefill of that prompt): without it a call's end waits for the groups that
drew the longest samples, every other row idle. Without a prompt cache every row is its own holder and takes
the next waiting (prompt, sample) pair (a prefill each).
`continuous=False` refills only when every row is free: batch after batch, each running until its
longest row ends (what the backend did before). Either way a row's tokens depend only on its prompt
and its identity (stream index * k + sample index: its random stream), not on its row or step.
"""
from __future__ import annotations

from collections import deque

import numpy as np

REFILL_EVERY = 8   # decode steps between polls while rows can be refilled (each poll is one host sync)
CHECK_EVERY = 32   # ... once nothing waits (the polls only end the run early)


def decode(runner, prompts: list[list[int]], order: list[int], *, k: int, max_new: int, seed: int,
           continuous: bool = True, lengths=None, progress=None, streams=None) -> dict[int, list[list[int]]]:
    """Decode `k` samples of every prompt in `order` (indices into `prompts`, non-empty token lists)
    on `runner`: {prompt index: its k token lists}. lengths[i][j]: at most this many tokens for that
    sample (benchmarks: rows that stop as if they drew EOS there). progress(m): m more prompts have
    all their samples. streams[i]: prompt i's stream index (default i): its sample j draws from
    identity streams[i] * k + j."""
    R, B = runner, runner.B
    shared = R.prefix is not None
    g = R.reps if shared else 1
    hc = R.caches if shared else 1                 # holders per group
    out = {i: [None] * k for i in order}
    left = dict.fromkeys(order, k)
    busy = np.zeros(B, dtype=bool)
    who = [(-1, -1)] * B                        # (prompt, sample) of each row
    held = np.zeros(B, dtype=np.int64)          # its holder
    off = np.zeros(B, dtype=np.int64)           # its write slot minus the step count
    cap = np.zeros(B, dtype=np.int64)           # its last write slot (token limit reached)
    work = [[-1, k, k] for _ in range(B // g * hc)]  # shared: (prompt, next sample, end) of each holder
    live = np.zeros(B // g * hc, dtype=np.int64)     # ... and its busy rows
    cur = [u * hc for u in range(B // g)]            # the holder a group's rows start samples from
    waiting = deque(order) if shared else deque((i, j) for i in order for j in range(k))
    sid = range(len(prompts)) if streams is None else streams
    steps = 0
    R.begin(seed)

    def lim(i, j):
        return max(1, min(max_new, lengths[i][j])) if lengths is not None else max_new

    def fill():
        free = np.flatnonzero(~busy).tolist()
        loads, starts = [], []

        def ready(u) -> bool:  # group u's current holder has a sample to start (loading the next prompt)
            h = cur[u]
            if work[h][1] < work[h][2]:
                return True
            mine = [u * hc + (h - u * hc + s) % hc for s in range(1, hc + 1)]  # its other holders, then h
            empty = [x for x in mine if live[x] == 0]
            if not (waiting and empty):
                return False
            cur[u] = empty[0]
            work[cur[u]] = [waiting.popleft(), 0, k]
            loads.append((cur[u], work[cur[u]][0]))
            return True

        def start(u, rows):  # free rows of group u start its next samples
            for r in rows:
                if not ready(u):
                    break
                h = cur[u]
                starts.append((r, h, work[h][0], work[h][1]))
                work[h][1] += 1
                live[h] += 1
        if shared:
            groups = {u: [r for r in range(u * g, (u + 1) * g) if not busy[r]]
                      for u in dict.fromkeys(r // g for r in free)}
            idle = []
            for u, rows in groups.items():
                n0 = len(starts)
                start(u, rows)
                if len(starts) == n0 and len(rows) == g and not waiting:
                    idle.append(u)
            for u in idle if continuous else ():  # nothing waits: take what its rows start now
                v = max(range(len(work)), key=lambda v: work[v][2] - work[v][1])
                left = work[v][2] - work[v][1]
                if left <= 0:
                    break
                h = cur[u]  # (no live row reads a free group's holders)
                work[h] = [work[v][0], work[v][2] - min(g, left), work[v][2]]
                work[v][2] = work[h][1]
                loads.append((h, work[h][0]))
                start(u, groups[u])
        else:
            for r in free:
                if not waiting:
                    break
                i, j = waiting.popleft()
                loads.append((r, i))
                starts.append((r, r, i, j))
        if loads:
            R.load([h for h, _ in loads], [prompts[i] for _, i in loads])
        if starts:
            rows = [r for r, _, _, _ in starts]
            R.start(rows, [h for _, h, _, _ in starts], [sid[i] * k + j for _, _, i, j in starts],
                    [len(prompts[i]) for _, _, i, _ in starts], [lim(i, j) for _, _, i, j in starts], max_new)
            for r, h, i, j in starts:
                n = lim(i, j)
                first = 0 if shared else len(prompts[i])  # the slot its first decode step writes
                busy[r], who[r], held[r], off[r], cap[r] = True, (i, j), h, first - steps, first + n - 2
        return bool(waiting) or (shared and any(p >= 0 and nx < end for p, nx, end in work))

    more = fill()
    while busy.any():
        b = np.flatnonzero(busy)
        o, c = off[b], cap[b]
        todo = int((c - o).max()) - steps + 1  # steps until every busy row has reached its token limit
        todo = max(0, min(todo, REFILL_EVERY if (continuous and more) else CHECK_EVERY))
        for _ in range(todo):  # attention covers the highest slot a live row writes in this step
            R.replay(R.att_len(max(0, int(np.minimum(o + steps, c).max()))))
            steps += 1
        fin, cnt = R.poll()
        done = [r for r in b.tolist() if fin[r]]
        if done:
            for r, toks in zip(done, R.harvest(done, [cnt[r] for r in done])):
                i, j = who[r]
                out[i][j] = toks
                left[i] -= 1
            busy[done] = False
            if shared:
                np.subtract.at(live, held[done], 1)
            complete = {who[r][0] for r in done if left[who[r][0]] == 0}
            if complete and progress is not None:
                progress(len(complete))
        if more and (continuous or not busy.any()):
            more = fill()
    return out
