# Not a config of its own: the AdamW recipe (warmup, cosine) that the Huginn, Parcae, Ouro,
# MoR and Relaxed configs keep while the FLT configs they take their size from train with
# the FLT code's Muon recipe. Import it after them, then set learning_rate, min_lr, warmup_iters.
optimizer = "adamw"
lr_schedule = "cosine"
weight_decay = 0.1
beta1 = 0.9
adam_eps = 1e-8
embedding_lr = 0.0
head_lr = 0.0
