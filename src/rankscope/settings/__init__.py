"""Settings, torch-free: typed run configuration and presets, what each setting accepts, token
units, the names every part shares (sites, metrics), contrasts between arms, and the seed
study's own settings."""
