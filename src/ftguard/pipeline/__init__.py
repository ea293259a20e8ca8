"""The align → finetune → evaluate pipeline: data plan, stages, evaluation points, results."""
