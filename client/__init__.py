"""Hospital side: site config, data preparation, the Flower ClientApp, privacy ledger, preflight."""
