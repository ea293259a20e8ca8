"""ftguard in other training frameworks (optional extras): ``ftguard.integrations.trl`` (the defenses inside an
``SFTTrainer`` script) and ``ftguard.integrations.axolotl`` (evaluation and release gate after an Axolotl job)."""
