"""How many decode steps the fast backend's schedule takes for one call, by rows per prompt (#17: the
`prompt_rows` default): the real scheduler and runner (privcode.synth.batching / runner) on CPU with a
one-layer random model, rows ending at lengths drawn as `privcode bench generate --lengths` draws them.
Steps, not seconds: what a GPU step costs is `privcode bench generate --profile`'s business.

    python scripts/schedule_steps.py                        # n 20, 80 rows, 32 prompts (8 batches' worth)
    python scripts/schedule_steps.py --rows 1280 --prompts 512 --lengths uniform:20 --prompt-caches 2
"""
import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from privcode.bench.generate_bench import row_lengths
from privcode.synth import runner
from privcode.synth.base import SamplingParams
from privcode.synth.fast import FastHFBackend

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--n", type=int, default=20)
ap.add_argument("--rows", type=int, default=80)
ap.add_argument("--prompts", type=int, default=32)
ap.add_argument("--new-tokens", type=int, default=200)
ap.add_argument("--lengths", default="uniform:20,geometric:60")
ap.add_argument("--prompt-rows", default="5,10,20")
ap.add_argument("--prompt-caches", default="1,2", help="prompt caches per group of rows (FastHFBackend.prompt_caches)")
a = ap.parse_args()
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=1024)).eval()
steps = [0]
replay = runner.Runner.replay


def counted(self, att):
    steps[0] += 1
    return replay(self, att)


runner.Runner.replay = counted
ids = torch.randint(1, 60, (a.prompts, 40)).tolist()
print(f"n {a.n}, {a.rows} rows, {a.prompts} prompts, at most {a.new_tokens} new tokens")
for spec in a.lengths.split(","):
    L = row_lengths(spec, a.prompts, a.n, a.new_tokens, torch.Generator().manual_seed(0))
    tokens = sum(map(sum, L)) if L else a.prompts * a.n * a.new_tokens
    for g in map(int, a.prompt_rows.split(",")):
        for c in map(int, a.prompt_caches.split(",")):
            steps[0] = 0
            fb = FastHFBackend(model=model, tokenizer=None, pad_token_id=0, batch_size=a.rows, prompt_rows=g,
                               prompt_caches=c)
            fb.generate_ids(ids, SamplingParams(max_new_tokens=a.new_tokens, temperature=0.8, top_p=0.95, n=a.n),
                            ignore_eos=True, lengths=L)
            print(f"{spec:14s} prompt_rows {g:3d}, caches {c}: {steps[0]:6d} steps, {tokens / steps[0]:7.1f} live rows "
                  f"per step ({tokens / steps[0] / a.rows:4.0%}), {a.rows // g * c} prompt caches read per step")
