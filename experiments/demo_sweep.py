"""Sweep `demoalign demo` settings; one line per (setting, arm) with the held-out metrics.

    python experiments/demo_sweep.py OUT_ROOT "learning_rate=1e-4 beta=0.1" "learning_rate=3e-4
    sft_weight=1" ...

Each quoted argument is one setting (key=value pairs of DemoConfig, over the defaults plus
`--base "key=value ..."`). Lines are appended to OUT_ROOT/sweep.tsv as they finish.
"""

import argparse
import shlex
from pathlib import Path

from demoalign.config import DemoConfig, load_config
from demoalign.eval.demo import run_demo


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out_root")
    p.add_argument("settings", nargs="+")
    p.add_argument("--base", default="seeds=2 eval_prompts=200 stage_eval_prompts=50")
    args = p.parse_args()
    root = Path(args.out_root)
    root.mkdir(parents=True, exist_ok=True)
    table = root / "sweep.tsv"
    for k, setting in enumerate(args.settings):
        overrides = (
            shlex.split(args.base)
            + shlex.split(setting)
            + [f"output_dir={root / f'run{k}'}", "overwrite=true"]
        )
        results = run_demo(load_config(DemoConfig, None, overrides))
        with table.open("a") as fh:
            for arm in results["arms"]:
                m = arm["metrics"]
                cells = [
                    f"{m[x]['mean']:.3f}±{m[x]['std']:.3f}"
                    for x in (
                        "task_reward_sampled",
                        "task_reward_greedy",
                        "pair_win_rate",
                        "logp_gap",
                    )
                ]
                fh.write("\t".join([setting, arm["name"], *cells]) + "\n")
            s = results["start_model"]
            fh.write(
                f"{setting}\tstart\t{s['task_reward_sampled']:.3f}\t{s['task_reward_greedy']:.3f}\t{s['pair_win_rate']:.3f}\t{s['logp_gap']:.3f}\n"
            )


if __name__ == "__main__":
    main()
