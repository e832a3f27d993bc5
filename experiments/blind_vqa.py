"""Zero-shot VQA of the frozen LM alone, without the picture: the prior BLIP-2's answers must beat.

BLIP-2 stage 2 answers "Question: ... Answer:" with the visual prompt in front (Sec. 4.2); the
same LM asked the same questions with no visual prompt can only answer from what it read
(`caption_lm` reads question-answer text: the answers' priors, e.g. "yes" half the time). This
scores those blind answers on a split's questions exactly as `vlp eval` scores BLIP-2's.

    python experiments/blind_vqa.py runs/blip2_exp/caption_lm/hf data/shapes [--split test]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlp.data.formats import open_dataset
from vlp.data.loader import QA_PROMPT
from vlp.eval.vqa import vqa_accuracy


@torch.no_grad()
def blind_answers(lm_dir: Path, questions: list[str], batch_size: int = 256) -> list[str]:
    """Greedy answers (at most 5 tokens, as BLIP-2's) to each question after the VQA prompt."""
    tokenizer = AutoTokenizer.from_pretrained(lm_dir, padding_side="left")
    lm = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    answers = []
    for start in range(0, len(questions), batch_size):
        prompts = [QA_PROMPT.format(q) for q in questions[start : start + batch_size]]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        out = lm.generate(
            **inputs,
            max_new_tokens=5,
            do_sample=False,
            num_beams=1,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers += [
            text.strip()
            for text in tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        ]
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lm", type=Path, help="the LM directory (transformers format) BLIP-2 stage 2 used")
    parser.add_argument("data", type=Path)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    dataset = open_dataset(args.data, split=args.split)
    pairs = [qa for i in range(len(dataset)) for qa in dataset.meta(i).get("qa", [])]
    predictions = blind_answers(args.lm, [qa["question"] for qa in pairs])
    print(
        json.dumps(
            {"vqa_blind": vqa_accuracy(predictions, [qa["answer"] for qa in pairs], [qa["type"] for qa in pairs])},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
