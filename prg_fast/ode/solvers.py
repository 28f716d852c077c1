"""Explicit Runge-Kutta solvers, as data: the fixed-step Butcher tableaus and the embedded pairs of
the adaptive methods (error weights, dense output, FSAL). One loop serves them all (integrate).
The pairs' conventions: docs/engine.md, "Inside the engine"."""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional, Sequence, Tuple


@dataclass(frozen=True)
class ButcherTableau:
    name: str
    order: int
    a: Tuple[Tuple[float, ...], ...]  # strictly lower triangular, row i has i entries
    b: Tuple[float, ...]
    c: Tuple[float, ...]
    # s, read on every stage of every loop: a field (len(b)), not a property call
    stages: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        s = len(self.b)
        object.__setattr__(self, "stages", s)
        if len(self.c) != s or len(self.a) != s:
            raise ValueError(f"tableau {self.name}: a, b and c must have {s} rows")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(f"tableau {self.name}: row {i} of a must have {i} entries (explicit method)")
            if abs(sum(row) - self.c[i]) > 1e-12:
                raise ValueError(f"tableau {self.name}: row {i} of a must sum to c[{i}]")
        if abs(sum(self.b) - 1.0) > 1e-12:
            raise ValueError(f"tableau {self.name}: b must sum to 1")


EULER = ButcherTableau("euler", order=1, a=((),), b=(1.0,), c=(0.0,))

MIDPOINT = ButcherTableau("midpoint", order=2, a=((), (0.5,)), b=(0.0, 1.0), c=(0.0, 0.5))

HEUN = ButcherTableau("heun", order=2, a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0))

RK4 = ButcherTableau(
    "rk4",
    order=4,
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    c=(0.0, 0.5, 0.5, 1.0),
)

RK4_38 = ButcherTableau(
    "rk4_38",  # Kutta's 3/8 rule, what torchdiffeq calls "rk4"
    order=4,
    a=((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
    b=(1 / 8, 3 / 8, 3 / 8, 1 / 8),
    c=(0.0, 1 / 3, 2 / 3, 1.0),
)

SOLVERS = {t.name: t for t in (EULER, MIDPOINT, HEUN, RK4, RK4_38)}


def _numbers(values) -> list:
    """'35/384 0 -1/8' (or a sequence of numbers / strings) as exact Fractions."""
    return [Fraction(v) for v in (values.split() if isinstance(values, str) else values)]


@dataclass(frozen=True)
class EmbeddedTableau(ButcherTableau):
    b_hat: Tuple[float, ...] = ()
    dense: Tuple[Tuple[float, ...], ...] = ()

    def __post_init__(self):
        super().__post_init__()
        s, name = self.stages, self.name
        if len(self.b_hat) != s or abs(sum(self.b_hat) - 1.0) > 1e-12:
            raise ValueError(f"tableau {name}: b_hat must have {s} entries summing to 1")
        if not self.fsal:
            raise ValueError(f"tableau {name}: the last stage must be f(t + h, y1) (last row of a equal to b, "
                             "c = 1, b = 0); EmbeddedTableau.of appends it")
        if len(self.dense) != s or len({len(row) for row in self.dense}) != 1:
            raise ValueError(f"tableau {name}: dense must have {s} rows of equal length")
        if any(abs(sum(row) - bi) > 1e-12 for row, bi in zip(self.dense, self.b)):
            raise ValueError(f"tableau {name}: dense output must equal b at theta = 1")
        consistency = [sum(row[p] for row in self.dense) for p in range(len(self.dense[0]))]
        if any(abs(v - (p == 0)) > 1e-12 for p, v in enumerate(consistency)):
            raise ValueError(f"tableau {name}: dense weights must sum to theta (sum_i b_i(theta) = theta)")

    @property
    def fsal(self) -> bool:
        return self.c[-1] == 1.0 and self.b[-1] == 0.0 and tuple(self.a[-1]) == tuple(self.b[:-1])

    @property
    def error(self) -> Tuple[float, ...]:
        """Weights of the error estimate, b - b_hat."""
        return tuple(b - bh for b, bh in zip(self.b, self.b_hat))

    def weights(self, theta) -> list:
        """The dense output's stage weights b_i(theta) (theta a number or a tensor)."""
        return [sum(c * theta ** (p + 1) for p, c in enumerate(row)) for row in self.dense]

    def slopes(self, theta: float) -> list:
        """Their derivatives b_i'(theta): how a dense output moves with its time."""
        return [sum((p + 1) * c * theta ** p for p, c in enumerate(row)) for row in self.dense]

    @classmethod
    def of(cls, name: str, order: int, c, a: Sequence, b, b_hat, mid=None, dense=None) -> "EmbeddedTableau":
        """A pair from its coefficients (strings such as "35/384", numbers): the FSAL stage appended
        when missing; `dense` polynomial stage weights, or `mid` (weights of y(t + h/2)) for the
        quartic through y0, y1, f0, f1 and the mid-point, or neither for the cubic Hermite."""
        c, b, b_hat = _numbers(c), _numbers(b), _numbers(b_hat)
        a = [_numbers(row) for row in a]
        if not (c and c[-1] == 1 and b[-1] == 0 and a[-1] == b[:-1]):
            c, a, b, b_hat = c + [Fraction(1)], a + [b], b + [Fraction(0)], b_hat + [Fraction(0)]
            dense = None if dense is None else [list(row) for row in dense] + [[0] * len(dense[0])]
        if dense is None:
            last = len(b) - 1
            mid = [bi / 2 + Fraction((i == 0) - (i == last), 8) for i, bi in enumerate(b)] if mid is None else \
                _numbers(mid) + [Fraction(0)] * (len(b) - len(_numbers(mid)))
            dense = [_quartic(bi, mi, i == 0, i == last) for i, (bi, mi) in enumerate(zip(b, mid))]
        return cls(name, order, tuple(tuple(map(float, row)) for row in a), tuple(map(float, b)),
                   tuple(map(float, c)), tuple(map(float, b_hat)),
                   tuple(tuple(float(Fraction(v)) for v in row) for row in dense))


def _quartic(b: Fraction, m: Fraction, first: bool, last: bool) -> list:
    """Stage weight of the quartic through y0, y1 = y0 + h sum b k, y_mid = y0 + h sum m k,
    f0 = k_0, f1 = k_last, as coefficients of theta .. theta^4."""
    f0, f1 = int(first), int(last)
    return [f0, f1 - 4 * f0 - 5 * b + 16 * m, 5 * f0 - 3 * f1 + 14 * b - 32 * m, 2 * f1 - 2 * f0 - 8 * b + 16 * m]


_DOPRI5_B = "35/384 0 500/1113 125/192 -2187/6784 11/84 0"
DOPRI5 = EmbeddedTableau.of(
    "dopri5", 5, "0 1/5 3/10 4/5 8/9 1 1",
    ["", "1/5", "3/40 9/40", "44/45 -56/15 32/9", "19372/6561 -25360/2187 64448/6561 -212/729",
     "9017/3168 -355/33 46732/5247 49/176 -5103/18656", _DOPRI5_B.rsplit(" ", 1)[0]],
    _DOPRI5_B, "1951/21600 0 22642/50085 451/720 -12231/42400 649/6300 1/60",
    mid="6025192743/60171106304 0 51252292925/130801643196 -2691868925/90256659456 "
        "187940372067/3189068634112 -1776094331/39487288512 11237099/470086768")

BOSH3 = EmbeddedTableau.of("bosh3", 3, "0 1/2 3/4 1", ["", "1/2", "0 3/4", "2/9 1/3 4/9"], "2/9 1/3 4/9 0",
                           "7/24 1/4 1/3 1/8")

ADAPTIVE_HEUN = EmbeddedTableau.of("adaptive_heun", 2, "0 1", ["", "1"], "1/2 1/2", "1 0")

FEHLBERG2 = EmbeddedTableau.of("fehlberg2", 2, "0 1/2 1", ["", "1/2", "1/256 255/256"], "1/512 255/256 1/512",
                               "1/256 255/256 0")

_DOPRI8_B = ("14005451/335480064 0 0 0 0 -59238493/1068277825 181606767/758867731 561292985/797845732 "
             "-1041891430/1371343529 760417239/1151165299 118820643/751138087 -528747749/2220607170 1/4 0")
DOPRI8 = EmbeddedTableau.of(
    "dopri8", 8,
    "0 1/18 1/12 1/8 5/16 3/8 59/400 93/200 5490023248/9719169821 13/20 1201146811/1299019798 1 1 1",
    ["", "1/18", "1/48 1/16", "1/32 0 3/32", "5/16 0 -75/64 75/64", "3/80 0 0 3/16 3/20",
     "29443841/614563906 0 0 77736538/692538347 -28693883/1125000000 23124283/1800000000",
     "16016141/946692911 0 0 61564180/158732637 22789713/633445777 545815736/2771057229 -180193667/1043307555",
     "39632708/573591083 0 0 -433636366/683701615 -421739975/2616292301 100302831/723423059 790204164/839813087 "
     "800635310/3783071287",
     "246121993/1340847787 0 0 -37695042795/15268766246 -309121744/1061227803 -12992083/490766935 "
     "6005943493/2108947869 393006217/1396673457 123872331/1001029789",
     "-1028468189/846180014 0 0 8478235783/508512852 1311729495/1432422823 -10304129995/1701304382 "
     "-48777925059/3047939560 15336726248/1032824649 -45442868181/3398467696 3065993473/597172653",
     "185892177/718116043 0 0 -3185094517/667107341 -477755414/1098053517 -703635378/230739211 "
     "5731566787/1027545527 5232866602/850066563 -4093664535/808688257 3962137247/1805957418 65686358/487910083",
     "403863854/491063109 0 0 -5068492393/434740067 -411421997/543043805 652783627/914296604 "
     "11173962825/925320556 -13158990841/6184727034 3936647629/1978049680 -160528059/685178525 "
     "248638103/1413531060 0", _DOPRI8_B.rsplit(" ", 1)[0]],
    _DOPRI8_B, "13451932/455176623 0 0 0 0 -808719846/976000145 1757004468/5645159321 656045339/265891186 "
    "-3867574721/1518517206 465885868/322736535 53011238/667516719 2/45 0 0",
    # Hairer's dense-output polynomials evaluated at theta = 1/2 (as torchdiffeq does)
    mid="0.041031303607394015 0 0 0 0 0.051005628019913443 0.23889306774121999 0.30968701439961027 "
        "-0.21723254717553503 0.078334056793319243 -0.001861436971558026 0.0070728442026784522 "
        "0.0069084737320050937 -0.013838404349047484")

_TSIT5_B = ("0.096460766818065229518 0.01 0.47988965041449957478 1.3790085741037418932 "
            "-3.2900695154360806799 2.3247105240997739824")
TSIT5 = EmbeddedTableau.of(
    "tsit5", 5, "0 0.161 0.327 0.9 0.98002554090450968573 1 1",
    ["", "0.161", "-0.0084806554923569885444 0.33548065549235698854",
     "2.8971530571054934321 -6.3594484899750748431 4.3622954328695814110",
     "5.3258648284392566044 -11.748883564062827878 7.4955393428898362083 -0.092495066361755249257",
     "5.8614554429464200287 -12.920969317847109292 8.1593678985761586432 -0.071584973281400997225 "
     "-0.028269050394068382909", _TSIT5_B],
    _TSIT5_B + " 0",
    "0.094680755765839458075 0.0091835655403432530968 0.48777052842476157079 1.2342975669304789857 "
    "-2.7077123499835254549 1.8666284181705870358 1/66",
    dense=[("1", "-2.7637061972748258", "2.9132554618219126", "-1.0530884977290216"),
           ("0", "0.1317", "-0.2234", "0.1017"),
           ("0", "3.9302962368947516", "-5.9410338721315048", "2.4906272856512528"),
           ("0", "-12.411077166933676", "30.338188630282321", "-16.548102889244902"),
           ("0", "37.509313416511041", "-88.178904894766404", "47.379521962819283"),
           ("0", "-27.896526289197286", "65.091894674793664", "-34.870657861496611"),
           ("0", "1.5", "-4", "2.5")])

EMBEDDED = {t.name: t for t in (DOPRI5, BOSH3, ADAPTIVE_HEUN, FEHLBERG2, DOPRI8, TSIT5)}


def get_embedded(method) -> Optional[EmbeddedTableau]:
    """The adaptive method `method` names (None: dopri5, as torchdiffeq), or None when it names
    a fixed-step one."""
    if method is None:
        return DOPRI5
    if isinstance(method, EmbeddedTableau):
        return method
    return EMBEDDED.get(method) if isinstance(method, str) else None


# torchdiffeq's names that mean something else here, or nothing: said in the error, not guessed
_TORCHDIFFEQ_NAMES = {
    "heun2": "torchdiffeq's heun2 is 'heun' here",
    "heun3": "Heun's third-order method is not provided (pass a ButcherTableau)",
    "explicit_adams": "multistep methods are not provided",
    "implicit_adams": "multistep methods are not provided",
    "scipy_solver": "torchdiffeq's scipy wrapper is not provided (odeint's dopri8 is the high-order adaptive method)",
}


def get_tableau(method) -> ButcherTableau:
    """The tableau `method` names (a ButcherTableau passes as it is); an unknown name is refused,
    saying what torchdiffeq's names mean here."""
    if isinstance(method, ButcherTableau):
        return method
    if not isinstance(method, str) or method not in SOLVERS:
        hint = _TORCHDIFFEQ_NAMES.get(method, "it is an adaptive method: odeint runs it" if method in EMBEDDED else "")
        raise ValueError(f"method must be one of {sorted(SOLVERS)} (or a ButcherTableau), got {method!r}"
                         + (f"; {hint}" if hint else ""))
    return SOLVERS[method]
