"""Keras 3 adapter: `BestCheckpoint`, a drop-in `keras.callbacks.ModelCheckpoint` driven by the shared policy.

Built from ModelCheckpoint's own arguments (a `filepath` and nothing else of
the policy) it is ModelCheckpoint: same files, same placeholders, same errors
and warnings, no resume, no pruning. Given policy fields, a `policy=`, or no
`filepath`, it hands every epoch end to the checkpoint engine: top-k best,
snapshots, a rolling last checkpoint, retention that survives restarts, and a
`fit()` that continues after a crash at the next epoch.

    model.fit(x, y, validation_data=(xv, yv), epochs=20,
              callbacks=[BestCheckpoint(monitor="val_loss", dirpath="ckpt", top_k=3)])

Mid-epoch saves. `every_n_steps` (optimizer steps; an integer `save_freq` means
the same in policy mode) and `every_n_minutes` save a training state inside an
epoch, named `last-epoch=E-step=S.keras`; it becomes the rolling last. Keras
cannot start an epoch at a given batch, so a run resumed from such a save
restarts epoch E from its first batch with the restored weights and optimizer
state: the batches of epoch E trained before the save are trained again, the
epochs end where an uninterrupted run ends, and the optimizer step count ends
higher by the number of repeated batches (a warning says how many).

Preemption (`save_on_preemption`, on by default). During fit() a SIGTERM only
sets a flag. At the next batch end (or epoch end) the callback saves a training
state tagged `preempted`, stops training, puts back the SIGTERM handler that was
there before fit() and raises the signal again, so the process ends as SIGTERM
would have ended it (or the user's own handler runs). An exception escaping a
training step (`model.train_function`, which the callback wraps for the length
of fit(); Ctrl-C during a step included) saves one too before it propagates.
Keras gives callbacks no hook for exceptions raised elsewhere (in another
callback, in validation): those end fit() without a save, and the next fit()
resumes from the last save before them. Under several processes
(multi-worker tf.distribute, multi-process JAX) only SIGTERM saves; each process
acts on its own signal and only the chief writes.

A resumable `.keras` file carries the resume payload (epoch, step, the random
states and the RNG seed states) inside it, as one more member of its zip archive
(`checkpoint_hooks.json`), which `keras.saving.load_model` and `load_weights` pass
over: every file beside it would cost a hash and an fsync at each save.

The rules of a fit (resume choice, triggers, preemption, exceptions) are the shared
`FitSession`'s; this package maps ModelCheckpoint's arguments (`arguments`), calls the
session from the callback's hooks (`best_checkpoint`), and does Keras's part of the
work (`framework`, `snapshot`, `guard`, `export`).

`async_save=True`: at the epoch end the training thread only copies what the save
writes (the config, and every variable Keras's own saving walk visits) to host
memory; a background thread writes the `.keras` or `.weights.h5` file, hashes it,
fsyncs, commits and prunes while the next epoch trains (see
`checkpoint_hooks.keras.snapshot`; legacy `.h5` files are still written on the
training thread). The next save and the end of fit() wait for it, and its error
surfaces there. Saves on preemption, and saves of a new best model with
`export_best`, are synchronous.
"""

from checkpoint_hooks.keras.best_checkpoint import BestCheckpoint

__all__ = ["BestCheckpoint"]
