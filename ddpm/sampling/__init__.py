"""Sampling: one driver, a table of steppers, the denoiser they share.

The floors, each importing only those below it::

    edits.py       inpainting (RePaint), SDEdit, DDIM inversion: uses of the table's samplers
    api.py         sample() and the per-sampler shorthands: the table's rows joined to steppers
    ancestral.py ddim.py dpm_solver.py unipc.py heun.py    the steppers, one module a family
    driver.py      the chain: timesteps, per-image noise, start and end, known region, callback
    denoiser.py    the model wrapped once: guidance, eps/x0/v, clipping, learned variance
    spacing.py     the timestep spacings (leading ... logsnr, karras)
    chain.py       the discrete chain's scalars (abar, lambda, sigma) the steppers step with
    table.py       SAMPLERS: a row per sampler, the settings it reads (no torch: ddpm.config
                   validates params with it before torch loads)

Adding a sampler is one stepper module and one row of :data:`ddpm.sampling.table.SAMPLERS`
(and its entry in :data:`ddpm.sampling.api.STEPPERS`).

This ``__init__`` imports nothing, so ``ddpm.config`` can read the table without torch.
"""
