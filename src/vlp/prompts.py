"""Text templates that both the data side and the models read, kept at the base so that neither
imports the other."""

QA_PROMPT = "Question: {} Answer:"  # BLIP-2's zero-shot VQA prompt (Sec. 4.2); its answer follows
