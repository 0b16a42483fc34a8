"""The centralized baseline behind ``lungmae train``: all data in one place, MAE pretraining then ILD
fine-tuning (``pipeline``), on the built-in phantoms or a prepared site cache (``data``: the phantoms, cached in
the workdir, and the split by patient)."""
