"""Per-layer count of needle (passkey digit) entries kept by SnapKV, Ada-SnapKV and LAVa at budget 128.

.venv/bin/python benchmarks/needle_by_layer.py > benchmarks/results/needle_by_layer.txt
"""

import sys

import lavakv

sys.path.insert(0, "benchmarks")
from passkey_quality import needle_positions

from lavakv.passkey import passkey_prompt

model, tok = lavakv.load_model()
for depth, seed in [(0.5, 2), (0.7, 3)]:
    p = passkey_prompt(tok, 1000, depth, seed=seed)
    needle = needle_positions(tok, p.text, p.passkey)
    print("depth", depth, "needle positions", needle)
    for m in ["snapkv", "ada-snapkv", "lava"]:
        out = lavakv.generate(model, tok, p.text, method=m, budget=128, max_new_tokens=8, chat_template=False)
        per_layer = []
        for layer in out.stats.kept_positions:
            per_layer.append(sum(len(set(needle) & set(h)) for h in layer))
        print(f"{m:>11} {out.text.strip()[:10]!r:14} needle entries kept per layer (of {3 * len(needle)}):", per_layer)
        if m == "lava":
            print("   lava layer budgets:", [round(b) for b in out.stats.layer_budgets])
