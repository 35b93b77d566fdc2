"""unionfs package."""
