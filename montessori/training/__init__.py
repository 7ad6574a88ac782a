"""Teacher DPO and student SFT on TRL trainers, with the paper's WSD schedule."""
