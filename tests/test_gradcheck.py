"""The gradient checker itself: it must fail on a wrong backward, or it proves nothing."""

import numpy as np
import pytest

from tinygrad_llm import Function
from tinygrad_llm.gradcheck import GradientMismatch, check_gradients


class SquareWithWrongBackward(Function):
    def forward(self, x):
        self.x = x
        return x * x

    def backward(self, g):
        return g * self.x  # wrong: d(x^2)/dx is 2x


class SquareInPlace(Function):
    def forward(self, x):
        x *= x  # wrong: mutates its input
        return x.copy()

    def backward(self, g):
        return g


def test_checker_rejects_a_wrong_backward():
    x = np.array([0.5, -1.0, 2.0])
    with pytest.raises(GradientMismatch, match="finite differences"):
        check_gradients(SquareWithWrongBackward.apply, [x])


def test_checker_rejects_an_op_that_mutates_its_input():
    with pytest.raises(GradientMismatch, match="modified"):
        check_gradients(SquareInPlace.apply, [np.array([0.5, 2.0])])


def test_checker_accepts_a_right_backward():
    check_gradients(lambda t: t * t, [np.array([0.5, -1.0, 2.0])])
