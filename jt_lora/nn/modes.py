"""Train/eval switching that keeps trainability right under Jittor.

Jittor's ``Module.eval()`` calls ``stop_grad()`` on every parameter and
``train()`` restores what it recorded at the *first* ``eval()`` only, so a
model frozen after that first call gets its frozen weights un-frozen by the
next ``train()``. ``AdapterModule`` records the trainable set afresh at every
``eval()``, restores exactly that set at ``train()``, and lets every adapter
layer below merge (eval) or unmerge (train) as loralib does.
"""
from ..backend import jt

__all__ = ["AdapterModule", "assign_keep_trainable"]


def assign_keep_trainable(var, value):
    """Overwrite a parameter's data in place; a frozen parameter stays frozen."""
    frozen = var.is_stop_grad()
    var.update(value.detach() if isinstance(value, jt.Var) else jt.array(value))
    if frozen:
        var.stop_grad()


class AdapterModule(jt.Module):
    """Base for jt_lora layers and models: loralib-style train()/eval()."""

    def _sync_mode(self):
        """Adapter layers merge/unmerge here; plain modules do nothing."""

    def _set_mode(self, training: bool):
        for m in self.modules():
            m.is_train = training
        for m in self.modules():
            if isinstance(m, AdapterModule):
                m._sync_mode()

    def eval(self):
        self._grad_state = {id(p): not p.is_stop_grad() for p in self.parameters()}
        for p in self.parameters():
            p.stop_grad()
        self._set_mode(False)
        return self

    def train(self):
        state = getattr(self, "_grad_state", None)
        if state is not None:
            for p in self.parameters():
                if state.get(id(p), not p.is_stop_grad()):
                    p.start_grad()
                else:
                    p.stop_grad()
            self._grad_state = None
        self._set_mode(True)
        return self
