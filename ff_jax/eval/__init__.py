"""Every metric, computed on decoded strings or score vectors (no model is called here): BBQ
(`bbq`), refusals and harmfulness (`safety`), toxicity scorers (`toxicity`), ROUGE and SQuAD
(`text`), and how well a score separates labelled groups (`classification`: AUROC, AUPRC, F1)."""
