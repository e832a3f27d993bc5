"""How often is a retrieval "miss" or an ITM "negative" true of the image? (shapes world)

Retrieval counts only an image's own 5 captions as right, and ITM training takes another
image's caption as a negative (ALBEF Sec. 3.2: the hardest by ITC similarity). In the shapes
world a caption names one to three objects, so another image's caption is often true of this
one too. The scene metadata says exactly which (`caption_is_true`); this script measures, on a
split's images, the share of true captions among:
  - random captions of other images;
  - each image's ITC top-k captions that are not its own (the kind of negatives ITM is trained on);
and the ITC top-1 caption's truth (R@1 that counts any true caption as right). With an ITM head,
also the mean ITM match probability of own captions, and of the other images' top-k captions
split into true and false ones: whether the head separates what is false from what is true.

    python experiments/false_negatives.py runs/vlmo/seed0 data/shapes [--images 200 --top 16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import vlp
from vlp.data.formats import open_dataset
from vlp.data.shapes import caption_is_true
from vlp.eval.encode import embed_images, embed_texts, itm_scorer
from vlp.eval.retrieval import blockwise_topk, texts_of


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a vlp run (or checkpoint) with ITC")
    parser.add_argument("data", type=Path, help="a shapes-world data set (its scene metadata is needed)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=200, help="images whose top-k captions are scored")
    parser.add_argument("--top", type=int, default=16, help="k of the ITC top-k (eval's --k-test)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, dataset = vlp.load(args.run), open_dataset(args.data, split=args.split)
    image_emb, kept, _ = embed_images(model, dataset)
    texts, owner = texts_of(dataset, kept)
    objects = [dataset.meta(i)["objects"] for i in kept]
    rows = range(min(args.images, len(kept)))
    top = blockwise_topk(
        image_emb[: len(rows)], embed_texts(model, texts), args.top + 5, similarity=model.embedding_similarity
    )
    others = {row: [j for j in top[row].tolist() if owner[j] != row][: args.top] for row in rows}
    random_texts = torch.randint(len(texts), (len(rows), args.top))
    truth = {row: [caption_is_true(texts[j], objects[row]) for j in others[row]] for row in rows}
    result = {
        "images": len(rows),
        "top": args.top,
        "random_other_true": 100
        * mean(
            [
                caption_is_true(texts[j], objects[row])
                for row in rows
                for j in random_texts[row].tolist()
                if owner[j] != row
            ]
        ),
        "itc_top_other_true": 100 * mean([t for row in rows for t in truth[row]]),
        "itc_hardest_other_true": 100 * mean([truth[row][0] for row in rows]),
        "itc_top1_true": 100 * mean([caption_is_true(texts[top[row, 0]], objects[row]) for row in rows]),
    }
    if model.has_itm():
        score = itm_scorer(model, dataset, kept, texts)
        own = (owner < len(rows)).nonzero().flatten()  # the captions of the scored images
        result["itm_own"] = mean(score(owner[own], own).tolist())
        other_scores = score(
            torch.tensor([row for row in rows for _ in others[row]]),
            torch.tensor([j for row in rows for j in others[row]]),
        )
        true = torch.tensor([t for row in rows for t in truth[row]])
        result["itm_other_true"] = mean(other_scores[true].tolist())
        result["itm_other_false"] = mean(other_scores[~true].tolist())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
