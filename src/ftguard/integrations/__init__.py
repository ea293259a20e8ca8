"""ftguard's defenses in other training frameworks (optional extras): ``ftguard.integrations.trl``."""
