"""LARS and LAMB (hvdtrain.torch.optim, hvdtrain.tf.optim) against the papers' formulas worked out here in
NumPy, on zero gradients, resumed from saved state, under Horovod's optimizer broadcast, and the PyTorch and
TensorFlow implementations against each other."""
import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import hvdtrain.tf  # noqa: F401  (tf-keras before TensorFlow)
import tensorflow as tf

from hvdtrain.tf import optim as tf_optim
from hvdtrain.torch import optim as torch_optim
from conftest import REPO, env

# A 2x2 weight (adapted: trust ratio and weight decay) and a bias of 2 (neither), over three steps.
W0 = np.array([[0.1, -0.2], [0.3, 0.4]])
B0 = np.array([0.05, -0.05])
GRADS = [(np.array([[0.2, -0.1], [0.05, 0.3]]), np.array([0.1, -0.2])),
         (np.array([[-0.05, 0.15], [0.1, -0.2]]), np.array([0.3, 0.1])),
         (np.array([[0.1, 0.1], [-0.3, 0.05]]), np.array([-0.2, 0.05]))]
SPEC = {"lars": dict(lr=0.5, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02),
        "lamb": dict(lr=0.05, beta_1=0.9, beta_2=0.999, eps=1e-6, weight_decay=0.01)}
TOL = 1e-6


# --- the formulas, one tensor at a time, in float64 -------------------------------------------------------
def norm(x):
    return float(np.sqrt(np.sum(x * x)))


def lars_reference(w, grads, adapted, lr, momentum, weight_decay, trust_coefficient):
    """You et al. 2017, Algorithm 1, lr outside the momentum buffer: the weights after each step."""
    v, out = np.zeros_like(w), []
    for g in grads:
        if adapted:
            w_norm, g_norm = norm(w), norm(g)
            if w_norm > 0 and g_norm > 0:
                local_lr = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm)
            else:
                local_lr = 1.0
            d = (g + weight_decay * w) * local_lr
        else:
            d = g
        v = momentum * v + d
        w = w - lr * v
        out.append(w)
    return out


def lamb_reference(w, grads, adapted, lr, beta_1, beta_2, eps, weight_decay):
    """You et al. 2019, Algorithm 2 with bias correction and phi the identity: the weights after each step."""
    m, v, out = np.zeros_like(w), np.zeros_like(w), []
    for t, g in enumerate(grads, start=1):
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        m_hat = m / (1 - beta_1 ** t)
        v_hat = v / (1 - beta_2 ** t)
        r = m_hat / (np.sqrt(v_hat) + eps)
        trust = 1.0
        if adapted:
            r = r + weight_decay * w
            w_norm, r_norm = norm(w), norm(r)
            if w_norm > 0 and r_norm > 0:
                trust = w_norm / r_norm
        w = w - lr * trust * r
        out.append(w)
    return out


def reference(name, w0, b0, grads, spec):
    """[(W, b)] after each step: the weight adapted, the bias not."""
    formula = lars_reference if name == "lars" else lamb_reference
    return list(zip(formula(w0, [g for g, _ in grads], True, **spec),
                    formula(b0, [g for _, g in grads], False, **spec)))


# --- the implementations ----------------------------------------------------------------------------------
def torch_optimizer(name, params, spec):
    if name == "lars":
        return torch_optim.Lars(params, **spec)
    return torch_optim.Lamb(params, lr=spec["lr"], betas=(spec["beta_1"], spec["beta_2"]), eps=spec["eps"],
                            weight_decay=spec["weight_decay"])


def tf_optimizer(name, spec):
    if name == "lars":
        return tf_optim.Lars(learning_rate=spec["lr"], momentum=spec["momentum"],
                             weight_decay=spec["weight_decay"], trust_coefficient=spec["trust_coefficient"])
    return tf_optim.Lamb(learning_rate=spec["lr"], beta_1=spec["beta_1"], beta_2=spec["beta_2"],
                         epsilon=spec["eps"], weight_decay=spec["weight_decay"])


class TorchRun:
    def __init__(self, name, spec, w0=W0, b0=B0):
        self.params = [torch.nn.Parameter(torch.tensor(x, dtype=torch.float32)) for x in (w0, b0)]
        self.optimizer = torch_optimizer(name, self.params, spec)

    def step(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = torch.tensor(g, dtype=torch.float32)
        self.optimizer.step()
        return self.weights()

    def weights(self):
        return [p.detach().numpy().copy() for p in self.params]


class TFRun:
    """The optimizer applied inside a tf.function, as hvdtrain's TensorFlow train step does."""

    def __init__(self, name, spec, w0=W0, b0=B0):
        self.variables = [tf.Variable(x, dtype=tf.float32) for x in (w0, b0)]
        self.optimizer = tf_optimizer(name, spec)
        self.optimizer.build(self.variables)
        self._apply = tf.function(lambda gw, gb: self.optimizer.apply_gradients(zip([gw, gb], self.variables)))

    def step(self, grads):
        self._apply(*(tf.constant(g, dtype=tf.float32) for g in grads))
        return self.weights()

    def weights(self):
        return [v.numpy().copy() for v in self.variables]


RUNS = {"torch": TorchRun, "tf": TFRun}


def assert_close(actual, expected, what):
    for label, a, e in zip(("weight", "bias"), actual, expected):
        error = np.abs(np.asarray(a, np.float64) - e).max()
        assert error <= TOL, f"{what} {label}: max difference {error:.3g}\n{a}\n{e}"


# --- tests --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w0", [W0, np.zeros((2, 2))], ids=["weights", "zero-weights"])
@pytest.mark.parametrize("name", ["lars", "lamb"])
@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_steps_follow_the_paper_formula(framework, name, w0):
    run = RUNS[framework](name, SPEC[name], w0=w0)
    expected = reference(name, w0, B0, GRADS, SPEC[name])
    for i, grads in enumerate(GRADS):
        assert_close(run.step(grads), expected[i], f"{framework} {name} step {i + 1}")


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_bias_is_excluded_from_trust_ratio_and_weight_decay(name):
    """The bias's expected values above are plain momentum SGD / Adam; adapting it would give others."""
    adapted = (lars_reference if name == "lars" else lamb_reference)(B0, [g for _, g in GRADS], True,
                                                                      **SPEC[name])
    plain = reference(name, W0, B0, GRADS, SPEC[name])
    assert np.abs(adapted[-1] - plain[-1][1]).max() > 100 * TOL
    got = TorchRun(name, SPEC[name])
    for grads in GRADS:
        bias = got.step(grads)[1]
    assert np.abs(bias - plain[-1][1]).max() <= TOL


@pytest.mark.parametrize("name", ["lars", "lamb"])
@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_zero_gradients_without_weight_decay_change_nothing(framework, name):
    run = RUNS[framework](name, {**SPEC[name], "weight_decay": 0.0})
    zero = (np.zeros_like(W0), np.zeros_like(B0))
    for _ in range(2):
        weights = run.step(zero)
    assert np.array_equal(weights[0], W0.astype(np.float32)) and np.array_equal(weights[1], B0.astype(np.float32))


@pytest.mark.parametrize("name", ["lars", "lamb"])
@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_zero_gradients_with_weight_decay_only_decay_the_weight(framework, name):
    """The documented rule: LARS W * (1 - lr * wd) (trust ratio 1, as SGD's L2); LAMB W * (1 - lr) (r = wd * W,
    trust ratio 1 / wd). The bias does not move; nothing is NaN, state included."""
    spec = SPEC[name]
    run = RUNS[framework](name, spec)
    weight, bias = run.step((np.zeros_like(W0), np.zeros_like(B0)))
    shrink = 1 - spec["lr"] * spec["weight_decay"] if name == "lars" else 1 - spec["lr"]
    assert_close([weight, bias], [W0 * shrink, B0], f"{framework} {name}")
    if framework == "torch":
        state = [t for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        assert state and all(torch.isfinite(t).all() for t in state)
    else:
        assert all(np.isfinite(v.numpy()).all() for v in run.optimizer.variables)


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_torch_state_dict_resumes_bitwise(name):
    uninterrupted = TorchRun(name, SPEC[name])
    for grads in GRADS:
        expected = uninterrupted.step(grads)

    first = TorchRun(name, SPEC[name])
    first.step(GRADS[0])
    buffer = io.BytesIO()
    torch.save({"model": first.weights(), "optimizer": first.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed = TorchRun(name, SPEC[name], *saved["model"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    for grads in GRADS[1:]:
        got = resumed.step(grads)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_tf_variables_assigned_from_saved_arrays_resume_bitwise(name):
    uninterrupted = TFRun(name, SPEC[name])
    for grads in GRADS:
        expected = uninterrupted.step(grads)

    first = TFRun(name, SPEC[name])
    first.step(GRADS[0])
    model, slots = first.weights(), [v.numpy() for v in first.optimizer.variables]  # as hvdtrain saves them

    resumed = TFRun(name, SPEC[name], *model)
    assert len(resumed.optimizer.variables) == len(slots)
    for variable, array in zip(resumed.optimizer.variables, slots):
        variable.assign(array)
    assert int(resumed.optimizer.iterations.numpy()) == 1
    for grads in GRADS[1:]:
        got = resumed.step(grads)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_torch_and_tf_agree(name):
    torch_run, tf_run = TorchRun(name, SPEC[name]), TFRun(name, SPEC[name])
    for i, grads in enumerate(GRADS):
        assert_close(torch_run.step(grads), tf_run.step(grads), f"{name} step {i + 1}")


@pytest.mark.parametrize("cls", [tf_optim.Lars, tf_optim.Lamb])
def test_tf_config_round_trips(cls):
    optimizer = cls(learning_rate=0.25, weight_decay=0.03)
    config = optimizer.get_config()
    assert config["weight_decay"] == 0.03 and cls.from_config(config).get_config() == config


def test_invalid_arguments_are_refused():
    params = [torch.nn.Parameter(torch.zeros(2))]
    for make in (lambda: torch_optim.Lars(params, lr=-1.0), lambda: torch_optim.Lars(params, momentum=1.0),
                 lambda: torch_optim.Lamb(params, betas=(0.9, 1.0)), lambda: torch_optim.Lamb(params, eps=0.0),
                 lambda: tf_optim.Lars(weight_decay=-0.1), lambda: tf_optim.Lamb(epsilon=0.0)):
        with pytest.raises(ValueError):
            make()


def test_horovod_broadcast_and_distributed_optimizer():
    """Horovod re-creates the class from its param groups, and fills a fresh optimizer's state by stepping it
    on zero gradients: both optimizers go through that and a real step (one rank, its own process)."""
    script = textwrap.dedent("""
        import torch
        import horovod.torch as hvd
        from hvdtrain.torch.optim import Lamb, Lars

        hvd.init()
        for cls, options in ((Lars, dict(lr=0.1, weight_decay=1e-4)), (Lamb, dict(lr=0.01, weight_decay=0.01))):
            torch.manual_seed(0)
            model = torch.nn.Linear(3, 2)
            optimizer = hvd.DistributedOptimizer(cls(model.parameters(), **options),
                                                 named_parameters=model.named_parameters())
            hvd.broadcast_optimizer_state(optimizer, root_rank=0)
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            state = optimizer.state_dict()["state"]
            assert len(state) == 2, state
            optimizer.zero_grad()
            model(torch.ones(4, 3)).square().sum().backward()
            optimizer.step()
            tensors = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
            assert all(torch.isfinite(t).all() for t in [*tensors, *model.parameters()])
        print("broadcast ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "broadcast ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
