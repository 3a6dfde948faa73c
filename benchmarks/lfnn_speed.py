"""Step time of lfnn-l and lfnn (dense and grouped worker heads) against BP, steps interleaved in one process.

    PYTHONPATH=. .venv/bin/python benchmarks/lfnn_speed.py >> results/speed/lfnn-interleaved.jsonl

Hidden 1000,1000, batch 128, Fashion-MNIST, one thread. Each of 60 batches is stepped by every rule in
turn (the first 5 untimed), so a shared machine's drift falls on all of them alike; one JSON line per
rule with the median step time and its ratio to BP's. Separate probe processes on this shared host
differed by up to 40 % from run to run.
"""
import json
import statistics
import time

import torch

from localcredit.experiment import RunSpec, build_rule, load_data

torch.set_num_threads(1)

cases = {"bp": ("bp", []), "lfnn-l dense": ("lfnn-l", []), "lfnn-l grouped": ("lfnn-l", ["worker_head=grouped"]),
         "lfnn dense": ("lfnn", []), "lfnn grouped": ("lfnn", ["worker_head=grouped"])}
data = None
rules = {}
for name, (rule, opts) in cases.items():
    spec = RunSpec(rule=rule, data="fashion-mnist", hidden=[1000, 1000], options=opts, seed=0)
    data = data or load_data(spec)
    rules[name] = build_rule(spec, data)
batches = [(data.x_train[i*128:(i+1)*128], data.y_train[i*128:(i+1)*128]) for i in range(60)]
times = {n: [] for n in cases}
for i, (x, y) in enumerate(batches):
    for n, r in rules.items():
        t = time.perf_counter()
        r.step(x, y)
        dt = time.perf_counter() - t
        if i >= 5:
            times[n].append(1000 * dt)
bp = statistics.median(times["bp"])
for n, t in times.items():
    median = statistics.median(t)
    print(json.dumps({"case": n, "ms_median": round(median, 2), "ratio_to_bp": round(median / bp, 3), "steps": len(t)}))
