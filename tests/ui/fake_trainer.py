"""A stand-in trainer for the job supervisor's lock and crash tests only (the browser test runs the real one).

usage: fake_trainer.py MODEL_PATH MODE   MODE: finish | crash | wait (runs until cancelled, honouring pause)
"""
import os
import signal
import sys
import time

from dreambooth.events import Cancelled, Checkpoint, Controls, Done, EventLog, Paused, Resumed, Start, Step
from dreambooth.store import ModelDir

model, mode = sys.argv[1], sys.argv[2]
model_dir = ModelDir(__import__("pathlib").Path(model))
log, controls = EventLog(model_dir.events), Controls(model_dir.control)
lock = model_dir.lock("training").__enter__()  # held until the process ends, as the real trainer holds it
log.emit(Start(total_steps=10, epochs=2, steps_per_epoch=5, step=0))
print("fake trainer started", flush=True)
for step in range(1, 11):
    if mode == "crash" and step == 3:
        print("CUDA out of memory (pretend)", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    pending = controls.pending()
    if "pause" in pending:
        log.emit(Paused(step))
        while "pause" in controls.pending() and "cancel" not in controls.pending():
            time.sleep(0.05)
        log.emit(Resumed(step))
    if "cancel" in controls.pending():
        controls.clear_all()
        log.emit(Cancelled(step, "cancelled by request"))
        sys.exit(0)
    if "save" in pending:
        controls.withdraw("save")
        log.emit(Checkpoint(step, f"{model}/fake_{step}.safetensors"))
    log.emit(Step(step, (step - 1) // 5, loss=1.0 / step, lr=1e-6, it_per_s=10.0, eta_s=10 - step, memory_mb=1.0))
    time.sleep(0.05 if mode != "wait" else 0.3)
    if mode == "wait" and step == 9:
        while "cancel" not in controls.pending():
            time.sleep(0.05)
log.emit(Done(10, "finished"))
