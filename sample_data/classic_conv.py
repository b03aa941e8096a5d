"""A correct loop implementation of the classic NHWC exercise, to try ``gradcheck --impl`` on:

    convcli gradcheck --impl sample_data/classic_conv.py

A_prev (m, n_H_prev, n_W_prev, n_C_prev), W (f, f, n_C_prev, n_C), b (1, 1, 1, n_C),
hparameters {"stride": s, "pad": p}. Break a line and run it again to see how convcli reports
the bug (tests/test_userimpl.py does exactly that with the lines marked by comments).
"""

import numpy as np


def zero_pad(X, pad):
    return np.pad(X, ((0, 0), (pad, pad), (pad, pad), (0, 0)))  # PAD


def conv_forward(A_prev, W, b, hparameters):
    m, n_H_prev, n_W_prev, _ = A_prev.shape
    f, _, _, n_C = W.shape
    stride, pad = hparameters["stride"], hparameters["pad"]
    n_H = (n_H_prev + 2 * pad - f) // stride + 1
    n_W = (n_W_prev + 2 * pad - f) // stride + 1
    Z = np.zeros((m, n_H, n_W, n_C))
    A_prev_pad = zero_pad(A_prev, pad)
    for i in range(m):
        for h in range(n_H):
            top = h * stride  # FORWARD_TOP
            for w in range(n_W):
                left = w * stride
                patch = A_prev_pad[i, top : top + f, left : left + f, :]
                for c in range(n_C):
                    Z[i, h, w, c] = np.sum(patch * W[:, :, :, c]) + b[0, 0, 0, c]
    return Z, (A_prev, W, b, hparameters)


def conv_backward(dZ, cache):
    A_prev, W, b, hparameters = cache
    m, _, _, _ = A_prev.shape
    f, _, _, n_C = W.shape
    stride, pad = hparameters["stride"], hparameters["pad"]
    _, n_H, n_W, _ = dZ.shape
    dA_prev_pad = zero_pad(np.zeros(A_prev.shape), pad)
    A_prev_pad = zero_pad(A_prev, pad)
    dW = np.zeros(W.shape)
    db = np.zeros(b.shape)
    for i in range(m):
        for h in range(n_H):
            top = h * stride  # BACKWARD_TOP
            for w in range(n_W):
                left = w * stride
                patch = A_prev_pad[i, top : top + f, left : left + f, :]
                for c in range(n_C):
                    dA_prev_pad[i, top : top + f, left : left + f, :] += (
                        W[:, :, :, c] * dZ[i, h, w, c]
                    )
                    dW[:, :, :, c] += patch * dZ[i, h, w, c]  # DW
                    db[:, :, :, c] += dZ[i, h, w, c]  # DB
    dA_prev = dA_prev_pad[:, pad : pad + A_prev.shape[1], pad : pad + A_prev.shape[2], :]  # UNPAD
    return dA_prev, dW, db
