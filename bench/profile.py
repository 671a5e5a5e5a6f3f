"""Sum py-spy raw (collapsed) stacks into the functions that cost the most.

    .venv/bin/python bench/profile.py DIR/p2p-throughput-improcessor-1.txt [--top 30]

Prints, per function, its self share (samples where it is the innermost
frame) and its total share (samples where it is anywhere on the stack).
"""

from __future__ import annotations

import argparse
import collections
import re

FRAME = re.compile(r"^(.*?) \((.*?)(?::\d+)?\)$")


def load(path: str):
    self_, total = collections.Counter(), collections.Counter()
    n = 0
    for line in open(path, encoding="utf-8", errors="replace"):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        k = int(count)
        n += k
        frames = []
        for f in stack.split(";"):
            m = FRAME.match(f)
            name = f"{m.group(1)} ({m.group(2).split('site-packages/')[-1]})" if m else f
            frames.append(name)
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        if not frames:
            continue
        self_[frames[-1]] += k
        for name in set(frames):
            total[name] += k
    return n, self_, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    n, self_, total = load(args.path)
    print(f"{n} samples")
    print("-- self")
    for name, k in self_.most_common(args.top):
        print(f"{100 * k / n:5.1f}%  {name}")
    print("-- total")
    for name, k in total.most_common(args.top):
        print(f"{100 * k / n:5.1f}%  {name}")


if __name__ == "__main__":
    main()
