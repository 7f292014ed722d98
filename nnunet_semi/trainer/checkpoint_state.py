"""The semi-supervised part of nnU-Net's checkpoints: ``semi_state`` (every auxiliary module and what is deployed)
written with nnU-Net's own dict in one atomic write, and a resume that survives damaged files and stock nnU-Net
checkpoints."""

from __future__ import annotations

import io
import os
import tempfile
from os.path import isfile, join

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_semi.components.ema import make_teacher
from nnunet_semi.trainer.checkpoints import CHECKPOINT_FILES, DamagedCheckpointError, atomic_torch_save, read_checkpoint

SEMI_STATE_KEY = "semi_state"


class CheckpointState(nnUNetTrainer):
    """``checkpoint["semi_state"]`` in every checkpoint, and ``network_weights`` as deployed."""

    def semi_state(self) -> dict:
        """What ``checkpoint["semi_state"]`` holds: plain tensors and numbers only (no plugin objects)."""
        return {"auxiliary": self.auxiliary.state_dict(), "deployed_weights": self.deployed_weights}

    def load_semi_state(self, state: dict) -> None:
        if "student" not in self.auxiliary and any(k.startswith("student.") for k in state["auxiliary"]):
            self.auxiliary["student"] = make_teacher(self.unwrapped_network())  # final checkpoint deploying the teacher
        self.auxiliary.load_state_dict(state["auxiliary"])
        self.deployed_weights = state.get("deployed_weights", "student")
        self._teacher_restored = True

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus ``semi_state`` (and the deployed weights), written once and moved into place
        atomically: a kill at any instant leaves the previous complete file or the new one, never a partial one."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        buffer = io.BytesIO()
        # nnU-Net 2.8's save_checkpoint builds its dict inline and only torch.saves it (no hook returns it): let it
        # save into memory, read that back, add ours, and write the file once
        super().save_checkpoint(buffer)
        buffer.seek(0)
        checkpoint = torch.load(buffer, map_location="cpu", weights_only=False)
        checkpoint[SEMI_STATE_KEY] = self.semi_state()
        deployed = self.deployed_network_state()
        if deployed is not None:
            checkpoint["network_weights"] = deployed
        self.write_checkpoint(checkpoint, filename)

    def write_checkpoint(self, checkpoint: dict, filename: str) -> None:
        """The one write of a checkpoint file (``checkpoints.atomic_torch_save``)."""
        atomic_torch_save(checkpoint, filename)

    def deployed_network_state(self) -> dict | None:
        """``network_weights`` to write instead of ``self.network``'s state (a deployable module that
        ``build_network_architecture`` builds at inference); None: ``self.network``'s."""
        return None

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's load plus ``semi_state``, robust to damaged files.

        A file that cannot be read (cut short by a crash before crash-safe writes, a full disk, a truncated copy) is
        named in the log, and the newest readable of ``checkpoint_latest``/``checkpoint_best`` in the same folder is
        loaded instead; with none readable, training starts fresh. A checkpoint without ``semi_state`` (stock
        nnU-Net's) loads the network, optimizer and logs; the teacher is rebuilt from the student and the other
        modules start fresh, as the log says.
        """
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, dict):
            source, checkpoint = None, filename_or_checkpoint
        else:
            source, checkpoint = self._readable_checkpoint(filename_or_checkpoint)
            if checkpoint is None:
                return
        semi_state = checkpoint.get(SEMI_STATE_KEY)
        loadable = self.prepare_loaded_checkpoint(checkpoint)
        if semi_state is None:
            loadable = self._with_auxiliary_optimizer_groups(loadable)
        if loadable is checkpoint and source is not None:
            super().load_checkpoint(source)
        else:  # nnU-Net's load_checkpoint reads files only: hand it the converted checkpoint as one
            with tempfile.TemporaryDirectory() as folder:
                converted = join(folder, "checkpoint.pth")
                torch.save(loadable, converted)
                super().load_checkpoint(converted)
        self._register_log_keys()  # nnU-Net's load replaced the logger's dict with the checkpoint's
        if semi_state is None:
            self.print_to_log_file(
                f"{source or 'the checkpoint'} has no '{SEMI_STATE_KEY}' (written by stock nnU-Net or another "
                f"trainer): network, optimizer and logs resumed at epoch {self.current_epoch}; the teacher is rebuilt "
                f"from the student and {sorted(set(self.auxiliary) - {'teacher'}) or 'no other module'} start fresh.")
            return
        self.load_semi_state(semi_state)

    def prepare_loaded_checkpoint(self, checkpoint: dict) -> dict:
        """The checkpoint as nnU-Net's ``load_checkpoint`` should see it (a method may convert its
        ``network_weights``); return the same object when nothing changes."""
        return checkpoint

    def _readable_checkpoint(self, filename: str) -> tuple[str | None, dict | None]:
        """``filename`` and its checkpoint, or, if it is damaged, the newest readable checkpoint beside it; (None,
        None) when no checkpoint there can be read."""
        try:
            return filename, read_checkpoint(filename)
        except DamagedCheckpointError as error:
            self.print_to_log_file(f"WARNING: damaged checkpoint, not resumed from: {error}")
        folder, damaged = os.path.dirname(os.path.abspath(filename)), os.path.abspath(filename)
        readable = []
        for name in CHECKPOINT_FILES[1:]:  # latest, best
            candidate = join(folder, name)
            if candidate == damaged or not isfile(candidate):
                continue
            try:
                readable.append((read_checkpoint(candidate), candidate))
            except DamagedCheckpointError as error:
                self.print_to_log_file(f"WARNING: damaged checkpoint, not resumed from: {error}")
        if not readable:
            self.print_to_log_file(f"WARNING: no readable checkpoint in {folder}: starting a new training from "
                                   f"epoch 0 (the damaged files are overwritten by the next saves).")
            return None, None
        checkpoint, chosen = max(readable, key=lambda item: item[0].get("current_epoch", 0))
        self.print_to_log_file(f"Resuming from {chosen} instead (epoch {checkpoint.get('current_epoch', 0)}).")
        return chosen, checkpoint

    def _with_auxiliary_optimizer_groups(self, checkpoint: dict) -> dict:
        """A checkpoint of the plain network alone has one optimizer parameter group; keep this trainer's groups
        for the auxiliary modules (fresh state) so that nnU-Net's optimizer load accepts it."""
        saved = checkpoint.get("optimizer_state")
        current = self.optimizer.state_dict()
        if not saved or len(saved["param_groups"]) >= len(current["param_groups"]):
            return checkpoint
        groups = saved["param_groups"] + current["param_groups"][len(saved["param_groups"]):]
        return checkpoint | {"optimizer_state": {"state": saved["state"], "param_groups": groups}}
