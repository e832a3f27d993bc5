"""Tiny BLIP training step (ITC + ITM with hard negatives + LM, forward + backward + AdamW):
vlp's model against the same step built from transformers' BLIP modules, holding the same
weights (written by `vlp.save(..., format="hf")`), in one process with alternating repetitions.

transformers has BLIP's modules but no pretraining step, so the baseline composes them the way
a user would: `BlipForImageTextRetrieval`'s ViT (one pass), text encoder, projections and ITM
head, and `BlipForConditionalGeneration`'s text decoder; the losses and the hard-negative sampler
are vlp's (`itc_loss`, `itm_inputs`, `lm_loss`) so both sides compute the same thing. The two
sides' losses are asserted equal before timing. Momentum encoders are off on both sides (the
baseline has none to offer); the transformers decoder holds its own copy of the weights vlp's
decoder shares with the encoder (BLIP's MED), so its optimizer updates more tensors.

    .venv/bin/python bench/blip_hf.py [--batch 64] [--reps 5]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from blip_tiny import TOKENS, bert_batch, checked_steps  # noqa: E402  (bench/ is the script's folder)
from clip_tiny import bench_arguments, compare, report
from generation_hf import hf_compatible_blip, transformers_twin
from mfu import add_mfu, matmul_peak  # noqa: E402
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from vlp.losses.itc import itc_loss
from vlp.losses.lm import lm_loss
from vlp.models.blip import with_first_token
from vlp.models.fusion import itm_inputs


class TransformersBLIP(torch.nn.Module):
    """BLIP's pretraining losses computed with transformers' modules."""

    def __init__(
        self,
        retrieval: BlipForImageTextRetrieval,
        captioning: BlipForConditionalGeneration,
        logit_scale: float,
        label_smoothing: float,
    ):
        super().__init__()
        self.retrieval, self.decoder = retrieval, captioning.text_decoder
        self.logit_scale = torch.nn.Parameter(torch.tensor(logit_scale))
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        r = self.retrieval
        ids, mask = batch["input_ids"], batch["attention_mask"]
        image_tokens = r.vision_model(pixel_values=batch["images"]).last_hidden_state
        text_states = r.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        image_feat = F.normalize(r.vision_proj(image_tokens[:, 0]), dim=-1)
        text_feat = F.normalize(r.text_proj(text_states[:, 0]), dim=-1)
        scale = self.logit_scale.exp()
        itm = itm_inputs(image_tokens, ids, mask, ids, image_feat, text_feat, scale)
        fused = r.text_encoder(
            input_ids=with_first_token(itm.texts, TOKENS["enc"]),
            attention_mask=itm.masks,
            encoder_hidden_states=itm.paired_images(),
        ).last_hidden_state
        logits = self.decoder(
            input_ids=with_first_token(ids, TOKENS["dec"]), attention_mask=mask, encoder_hidden_states=image_tokens
        ).logits
        return {
            "itc": itc_loss(image_feat, text_feat, scale),
            "itm": F.cross_entropy(r.itm_head(fused[:, 0]), itm.labels),
            "lm": lm_loss(logits, ids, mask, label_smoothing=self.label_smoothing),
        }


def main() -> None:
    args = bench_arguments(__doc__, batch=64, reps=5, warmup=1)
    model, cfg = hf_compatible_blip(contrastive={"momentum": 0.0})
    baseline = TransformersBLIP(
        transformers_twin(model, BlipForImageTextRetrieval),
        transformers_twin(model, BlipForConditionalGeneration),
        math.log(model.contrast.scale().item()),
        model.cfg.label_smoothing,
    )
    steps, losses = checked_steps({"vlp": model, "transformers": baseline}, bert_batch(cfg, args.batch))
    row = compare(
        "BLIP train step vs transformers modules (samples/s)",
        steps,
        args.reps,
        args.warmup,
        args.precision,
        args.batch,
        baseline="transformers",
    )
    rows = [add_mfu(row, steps, args.batch, matmul_peak(args.precision))]
    meta = {
        "params_vlp": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params_transformers": sum(p.numel() for p in baseline.parameters() if p.requires_grad),
        "losses": losses["vlp"],
    }
    report(rows, args.out, meta)


if __name__ == "__main__":
    main()
