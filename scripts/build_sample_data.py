"""Build the bundled sample data under data/ from the Debian catalog text in ../shared/data/.

    python scripts/build_sample_data.py [--shared ../shared/data]

For each language: training items (title, description, and text = "title. description") and a BEIR-style test folder
(query = a held-out item's title, relevant document = its description, every distinct description of the
catalog as the collection). Deterministic (seed 0).
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from src.create_dataset import holdout_split, save_beir  # noqa: E402
from src.tables import read_table, write_table  # noqa: E402

# language -> (source file, items used, test items)
CATALOGS = {"ru": ("debian_packages_ru.jsonl", None, 600), "en": ("debian_packages_en.jsonl", 4000, 600)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    for lang, (file, n_items, n_test) in CATALOGS.items():
        frame = read_table(Path(args.shared) / file)
        if n_items:
            frame = frame.sample(n=n_items, random_state=0).sort_index()
        train, test = holdout_split(frame, "title", "description", n_test, seed=0)
        out = ROOT / "data" / f"{lang}_catalog"
        write_table(train, out / "train.jsonl")
        save_beir(test, out / "test")
        print(f"{lang}: {len(train)} training texts, {len(test.queries)} test queries, "
              f"{len(test.corpus)} documents -> {out}")


if __name__ == "__main__":
    main()
