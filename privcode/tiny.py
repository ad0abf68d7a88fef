"""A tiny causal LM built on the fly from public text, for tests and smoke runs.

    privcode build-model --out /tmp/tiny --params '{"source": "tiny", "pretrain_steps": 300}'

Tokenizer: byte-level BPE trained on part of the Python standard library (a public corpus
that ships with every Python) plus public task-generator text. Model: a 2-layer Llama with
random init, pre-trained for a few hundred steps on public generated tasks (seed offset
so that they never coincide with the private records of a run) in the `qa` prompt format,
for both answering and describing, so that the tiny pipeline produces code that runs.
"""
from __future__ import annotations

import logging
import random
import sysconfig
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PUBLIC_SEED_OFFSET = 1_000_003  # public pre-training tasks use a seed no config uses for private data
VOCAB = 1024  # small enough for a fast softmax, large enough that code is ~3 chars/token
MAX_LEN = 384


def _stdlib_text(max_files: int = 60) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[:max_files]
    return [f.read_text(encoding="utf-8", errors="ignore")[:20000] for f in files]


def _public_texts(seed: int, n: int) -> list[str]:
    from privcode.data import taskgen
    from privcode.data.prompts import describe_prompt, described, extract_code, render_example

    texts = []
    for t in taskgen.generate_tasks(seed + PUBLIC_SEED_OFFSET, n):
        rec = taskgen.to_record(t)
        p, a = render_example(rec["problem"], rec["solution"], "qa")
        texts.append(p + a)
        code = extract_code(rec["solution"], "python") or ""
        p, a = render_example(describe_prompt(code), described(rec["problem"]), "qa")
        texts.append(p + a)
    return texts


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=MAX_LEN)


def build_tiny(out: Path, steps: int = 300, seed: int = 0, n_tasks: int = 400) -> None:
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    texts = _public_texts(seed, n_tasks)
    tok = build_tokenizer(_stdlib_text() + texts)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAX_LEN,
                      tie_word_embeddings=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    enc = [tok(t + tok.eos_token)["input_ids"][:MAX_LEN] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    model.train()
    for step in tqdm(range(steps), desc="pretrain tiny", unit="step"):
        batch = rng.sample(enc, 16)
        T = max(map(len, batch))
        ids = torch.full((len(batch), T), tok.pad_token_id)
        lab = torch.full((len(batch), T), -100)
        for i, b in enumerate(batch):
            ids[i, :len(b)] = torch.tensor(b)
            lab[i, :len(b)] = torch.tensor(b)
        loss = model(input_ids=ids, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        for g in opt.param_groups:  # linear decay: a stable end point matters more than speed
            g["lr"] = 3e-3 * (1 - (step + 1) / steps) + 1e-4
    log.info("tiny model: final pre-training loss %.3f", float(loss))
    model.save_pretrained(out)
    tok.save_pretrained(out)
