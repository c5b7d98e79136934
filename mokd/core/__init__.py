"""The foundation every mokd package stands on: errors, validation, atomic writes, results, the backbone
registry, datasets, the checkpoint loader, the feature extractor, schedules and process placement.

Nothing here imports the evaluation protocols, the trainer, the analyses or the CLI."""
