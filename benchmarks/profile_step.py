"""Where an IRFT training step spends its time: forward, backward, clip + optimiser, and the top
kernels of one step (torch.profiler). Usage: python benchmarks/profile_step.py --device cuda"""

import argparse
import time

import torch

from demoalign.config import IRFTConfig
from demoalign.methods.irft import count_pairs, irft_loss_fn
from demoalign.pairs import Pair, fill_reference_logps
from demoalign.runio import MetricsLog
from demoalign.tiny import TinyShape, tiny_llama, train_tokenizer
from demoalign.trainer import Trainer, make_accelerator


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    tok = train_tokenizer(vocab_size=512)
    shape = TinyShape(args.hidden_size, args.layers, args.heads, vocab_size=args.vocab_size)
    model = tiny_llama(tok, shape)
    cuda = args.device == "cuda"
    config = IRFTConfig(
        model="x",
        data="x",
        batch_size=args.batch_size,
        cpu=not cuda,
        show_progress=False,
        mixed_precision="bf16" if cuda else "no",
        learning_rate=1e-5,
    )
    acc = make_accelerator(config)
    trainer = Trainer(config, model, acc, MetricsLog("/dev/null", enabled=False))
    g = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(args.batch_size):
        n_prompt = args.seq_len // 4
        n_resp = int(torch.randint(args.seq_len // 4, args.seq_len - n_prompt, (1,), generator=g))

        def ids(n):
            return torch.randint(2, 500, (n,), generator=g).tolist()

        pairs.append(
            Pair(
                ids(n_prompt),
                ids(n_resp) + [tok.eos_token_id],
                ids(n_resp // 2) + [tok.eos_token_id],
                index=i,
            )
        )
    fill_reference_logps(trainer.unwrapped, pairs, tok.pad_token_id, 8, acc.autocast)
    loss_fn = irft_loss_fn(0.1, "sigmoid", 0.0, tok.pad_token_id)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        trainer.step(pairs, loss_fn, count_pairs(pairs))
    sync()
    timings = {"forward": 0.0, "backward": 0.0, "clip+optimizer": 0.0, "whole step": 0.0}
    n = 3
    for _ in range(n):
        t0 = time.perf_counter()
        with acc.autocast():
            losses, _, _ = loss_fn(trainer.model, pairs)
        sync()
        t1 = time.perf_counter()
        acc.backward(losses.mean())
        sync()
        t2 = time.perf_counter()
        acc.clip_grad_norm_(trainer.model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        trainer.step(pairs, loss_fn, count_pairs(pairs))
        sync()
        t4 = time.perf_counter()
        for k, v in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            timings[k] += v / n
    for k, v in timings.items():
        print(f"{k:16s} {v * 1000:9.1f} ms")
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    )
    with torch.profiler.profile(activities=activities) as prof:
        trainer.step(pairs, loss_fn, count_pairs(pairs))
        sync()
    key = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=60))


if __name__ == "__main__":
    main()
