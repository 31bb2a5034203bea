"""Quality evaluation: fidelity to the base model (teacher), perplexity, multiple-choice tasks."""
