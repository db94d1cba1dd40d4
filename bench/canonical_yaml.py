"""How fast is the canonical YAML of an object, against PyYAML's CSafeDumper writing it?

Two sets of objects, as the pipeline dumps them (sanitized):

- ``corpus``: every object of the audit corpus (tests/data/audit-corpus), each dumped with
  the fast emitter's memory of keys and strings emptied first (its worst case);
- ``e2e``: 20,000 distinct ConfigMaps of bench/end_to_end.py, one after the other as serve
  sees them (names, uids and versions new each time, field names and labels repeating).

Each object is dumped by ``canonical.dump`` (the fast emitter, PyYAML for what it leaves) and
by ``canonical.pyyaml_dump`` (PyYAML's CSafeDumper alone, the definition), in the same run;
every pair of outputs must be byte-identical. Prints µs per object for both, the ratio, and
how many objects the fast emitter wrote itself.

    python bench/canonical_yaml.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from end_to_end import _create  # noqa: E402  (bench/, the script's own folder)

from audit_reverser.pipeline import blockyaml, canonical  # noqa: E402
from audit_reverser.pipeline.sanitize import sanitize  # noqa: E402


def configmaps(n: int) -> list[dict[str, Any]]:
    return [
        sanitize(
            _create(i, f"team-{i % 200:03d}", f"cm-{i:07d}")["responseObject"],
            api_group="",
            resource="",
        )
        for i in range(n)
    ]


def corpus() -> list[dict[str, Any]]:
    found = []
    for path in sorted((REPO / "tests" / "data" / "audit-corpus").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            for field in ("requestObject", "responseObject"):
                body = event.get(field)
                if isinstance(body, dict) and "kind" in body:
                    found.append(sanitize(body, api_group="", resource=""))
    return found


def _forget() -> None:
    if canonical._emitter is not None:
        canonical._emitter.key_texts.clear()
        canonical._emitter.scalar_texts.clear()


def per_object_us(
    dump: Callable[[Any], bytes], items: list[dict[str, Any]], rounds: int, *, cold: bool
) -> float:
    best = float("inf")
    for _ in range(rounds):  # the best round: the machine is shared
        _forget()
        elapsed = 0.0
        for item in items:
            if cold:
                _forget()
            begin = time.perf_counter()
            dump(item)
            elapsed += time.perf_counter() - begin
        best = min(best, elapsed / len(items))
    return best * 1e6


def report(name: str, items: list[dict[str, Any]], rounds: int, *, cold: bool) -> None:
    fast = 0
    for item in items:
        if canonical.dump(item) != canonical.pyyaml_dump(item):
            raise SystemExit(f"output differs for {item.get('kind')} {item.get('metadata')}")
        try:
            assert canonical._emitter is not None
            canonical._emitter.emit(item, canonical._ORDER)
            fast += 1
        except blockyaml.Unsupported:
            pass
    size = sum(len(canonical.dump(item)) for item in items) / len(items)
    ours = per_object_us(canonical.dump, items, rounds, cold=cold)
    reference = per_object_us(canonical.pyyaml_dump, items, rounds, cold=cold)
    print(
        f"{name:<7} {len(items):>7,} {size:>7,.0f} B {fast:>7,} {ours:>8.1f} µs "
        f"{reference:>8.1f} µs {reference / ours:>6.1f}×",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    print(
        f"{'objects':<7} {'count':>7} {'YAML':>9} {'fast':>7} {'ours':>11} "
        f"{'CSafeDumper':>11} {'ratio':>7}"
    )
    report("corpus", corpus(), args.rounds, cold=True)
    report("e2e", configmaps(20_000), max(1, args.rounds // 20), cold=False)


if __name__ == "__main__":
    main()
