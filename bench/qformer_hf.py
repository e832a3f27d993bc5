"""BLIP-2 stage 1 training step (ITC with the best query + ITM with hard negatives, forward +
backward + AdamW, the image tower frozen): vlp's Q-Former against the same step built from
transformers' `Blip2ForImageTextRetrieval` modules, holding the same weights, in one process
with alternating repetitions (medians, ratio).

transformers has the Q-Former but no pretraining step (and no ITG: its Q-Former has no causal
query-text mask), so both sides run ITC + ITM; the losses and the hard-negative sampler are
vlp's on both sides, and the two sides' losses are asserted equal before timing. The image
tower is frozen on both sides (BLIP-2 Sec. 3.1); its last LayerNorm (`ln_vision`) trains.

    .venv/bin/python bench/qformer_hf.py [--batch 64] [--reps 5]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from blip_tiny import TOKENS, bert_batch, checked_steps  # noqa: E402  (bench/ is the script's folder)
from clip_tiny import VOCAB, bench_arguments, compare, report
from mfu import add_mfu, matmul_peak  # noqa: E402
from transformers import Blip2Config, Blip2ForImageTextRetrieval

import vlp
from vlp.config import load_run_config, recipe_config_path
from vlp.interop import blip2 as blip2_interop
from vlp.interop.mapping import Entry, block_entries, from_vlp, pairs, tower_to_hf
from vlp.losses.itc import itc_loss, max_query_similarity
from vlp.models.fusion import itm_inputs

TEXT_FFN = {
    "mlp.fc1.{p}": "intermediate.dense.{p}",
    "mlp.fc2.{p}": "output.dense.{p}",
    "norm2.{p}": "output.LayerNorm.{p}",
}


def models(size: str):
    """vlp's stage-1 model (ITC + ITM; BLIP's ViT flavour, every block run, as transformers
    has it) and `Blip2ForImageTextRetrieval` with its weights; the run config."""
    cfg = load_run_config("blip2_stage1", recipe_config_path("blip2_stage1", size))
    vision = {**cfg.model["vision"], "ln_pre": False, "patch_bias": True}
    torch.manual_seed(0)
    model = vlp.create_model(
        "blip2_stage1",
        {
            **cfg.model,
            "vision": vision,
            "vision_layers": vision["layers"],
            "objectives": ["itc", "itm"],
            "tokens": TOKENS,
            "qformer": {**cfg.model["qformer"], "vocab_size": VOCAB},
        },
    )
    v, q = model.cfg.vision, model.cfg.qformer
    hf = Blip2ForImageTextRetrieval(
        Blip2Config(
            vision_config={**tower_to_hf(v), "image_size": v.image_size, "patch_size": v.patch_size},
            qformer_config={
                **tower_to_hf(q),
                "vocab_size": VOCAB,
                "max_position_embeddings": q.context_length,
                "cross_attention_frequency": q.cross_attention_every,
                "encoder_hidden_size": v.width,
                "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0,
                "use_qformer_text_input": True,
            },
            num_query_tokens=q.num_queries,
            image_text_hidden_size=model.cfg.embed_dim,
        )
    )
    state = model.state_dict()
    entries = [e for e in blip2_interop.hf_entries(model) if e.vlp in state] + [
        *block_entries("qformer.text.transformer.blocks", "qformer.encoder.layer", q.layers, TEXT_FFN),
        *pairs("qformer.text.", "embeddings.", [("token_embed", "word_embeddings")], params=("weight",)),
        Entry("qformer.text.pos_embed", ("embeddings.position_embeddings.weight",)),
        *pairs(
            "", "", [("vision_proj", "vision_projection"), ("text_proj", "text_projection"), ("itm_head", "itm_head")]
        ),
    ]
    missing, unexpected = hf.load_state_dict(from_vlp(state, entries, hf.state_dict()), strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k], (missing, unexpected)
    hf.vision_model.embeddings.requires_grad_(False)
    hf.vision_model.encoder.requires_grad_(False)
    return model, hf, cfg


class TransformersStage1(torch.nn.Module):
    """BLIP-2 stage 1's ITC and ITM computed with transformers' modules."""

    def __init__(self, hf: Blip2ForImageTextRetrieval, logit_scale: float):
        super().__init__()
        self.hf = hf
        self.logit_scale = torch.nn.Parameter(torch.tensor(logit_scale))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hf, ids, mask = self.hf, batch["input_ids"], batch["attention_mask"]
        vision = hf.vision_model
        with torch.no_grad():
            tokens = vision.encoder(vision.embeddings(batch["images"])).last_hidden_state
        feats = vision.post_layernorm(tokens)  # ln_vision, trained
        queries = hf.query_tokens.expand(feats.shape[0], -1, -1)
        query_out = hf.qformer(query_embeds=queries, encoder_hidden_states=feats).last_hidden_state
        text_out = hf.qformer(
            query_embeds=hf.embeddings(input_ids=ids), query_length=0, attention_mask=mask
        ).last_hidden_state
        image_emb = F.normalize(hf.vision_projection(query_out), dim=-1)
        text_emb = F.normalize(hf.text_projection(text_out[:, 0]), dim=-1)
        scale = self.logit_scale.exp()
        itm = itm_inputs(feats, ids, mask, ids, image_emb, text_emb, scale, similarity=max_query_similarity)
        num_queries = queries.shape[1]
        pairs_queries = hf.query_tokens.expand(itm.texts.shape[0], -1, -1)
        joint_mask = torch.cat([torch.ones_like(itm.masks[:, :1]).expand(-1, num_queries), itm.masks], dim=1)
        fused = hf.qformer(
            query_embeds=hf.embeddings(input_ids=itm.texts, query_embeds=pairs_queries),
            query_length=num_queries,
            attention_mask=joint_mask,
            encoder_hidden_states=itm.paired_images(),
        ).last_hidden_state
        return {
            "itc": itc_loss(image_emb, text_emb, scale, similarity=max_query_similarity),
            "itm": F.cross_entropy(hf.itm_head(fused[:, :num_queries]).mean(dim=1), itm.labels),
        }


def main() -> None:
    args = bench_arguments(__doc__, batch=64, reps=5, warmup=1)
    model, hf, cfg = models(args.size)
    baseline = TransformersStage1(hf, model.logit_scale.item())
    steps, losses = checked_steps({"vlp": model.train(), "transformers": baseline.train()}, bert_batch(cfg, args.batch))
    row = compare(
        "BLIP-2 stage 1 step (ITC + ITM) vs transformers' Q-Former (samples/s)",
        steps,
        args.reps,
        args.warmup,
        args.precision,
        args.batch,
        baseline="transformers",
    )
    rows = [add_mfu(row, steps, args.batch, matmul_peak(args.precision))]
    report(rows, args.out, {"losses": losses["vlp"], "queries": model.cfg.qformer.num_queries})


if __name__ == "__main__":
    main()
