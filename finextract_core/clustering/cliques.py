"""The clique engine: the paper's greedy clique partition (repeatedly remove a maximum clique), computed exactly with a
bitset branch and bound, lexicographically first among maximum cliques, within a work budget; and a cheaper clique
cover for graphs too dense for that budget."""
from __future__ import annotations

import heapq

import numpy as np
from scipy.sparse.csgraph import connected_components

# Steps (search nodes + vertices coloured) one maximum-clique search may use: ~0.1-0.2 s of Python on the 2-core
# development machine. Graphs of well separated candidates need far fewer; dense low-threshold graphs need
# astronomically more (the paper's code times out there).
DEFAULT_WORK_BUDGET = 60_000


class WorkBudgetExceeded(Exception):
    """A maximum-clique search needed more steps than allowed."""


class _Budget:
    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def spend(self, steps: int) -> None:
        self.used += steps
        if self.used > self.limit:
            raise WorkBudgetExceeded


class _Graph:
    """Adjacency bitsets (Python ints, bit j of rows[i] = edge i-j) of one component, vertices in index order."""

    def __init__(self, rows: list[int]):
        self.rows = rows
        self.size = len(rows)
        full = (1 << self.size) - 1
        self.later = [full ^ ((1 << (v + 1)) - 1) for v in range(self.size)]  # vertices after v
        # Colouring is the hot loop of dense searches: one precomputed mask saves big-int operations per vertex.
        self.non_neighbours = [full ^ row ^ (1 << v) for v, row in enumerate(rows)]

    def colour_classes(self, candidates: int, cap: int, budget: _Budget) -> int:
        """Greedy colouring of ``candidates``; returns the number of colour classes, or ``cap`` once it reaches it.

        A clique inside ``candidates`` has at most one vertex per class, so this bounds the clique size.
        """
        classes, uncoloured, coloured = 0, candidates, 0
        while uncoloured:
            classes += 1
            if classes >= cap:
                break
            free = uncoloured
            while free:
                lowest = free & -free
                uncoloured ^= lowest
                free &= self.non_neighbours[lowest.bit_length() - 1]
                coloured += 1
        budget.spend(coloured + 1)
        return classes

    def first_clique(self, candidates: int, size: int, budget: _Budget) -> int | None:
        """The lexicographically first clique of exactly ``size`` vertices inside ``candidates`` (bitmask), or None.

        Depth first, lowest vertex included first: cliques are met in lexicographic order of their sorted members.
        """
        if size == 0:
            return 0
        if candidates.bit_count() < size or self.colour_classes(candidates, size, budget) < size:
            return None
        while candidates.bit_count() >= size:
            lowest = candidates & -candidates
            vertex = lowest.bit_length() - 1
            rest = self.first_clique(candidates & self.rows[vertex], size - 1, budget)
            if rest is not None:
                return rest | lowest
            candidates ^= lowest
        return None

    def greedy_partition(self, min_size: int, budget_limit: int) -> list[list[int]]:
        """Repeatedly remove the lexicographically first maximum clique; return the cliques of >= min_size vertices.

        Keeps for each vertex v an upper bound on the largest clique whose lowest vertex is v (it stays valid as the
        graph shrinks), so each removal re-examines only vertices whose bound is the current maximum. The first
        vertex with the maximum bound that attains it roots the lexicographically first maximum clique. Each
        removal's search may use ``budget_limit`` steps (WorkBudgetExceeded otherwise).
        """
        alive = (1 << self.size) - 1
        bound = [1 + (row & later).bit_count() for row, later in zip(self.rows, self.later)]
        if self._first_search_exceeds(bound, min_size, budget_limit):
            raise WorkBudgetExceeded
        heap = [(-b, v) for v, b in enumerate(bound)]
        heapq.heapify(heap)
        cliques: list[list[int]] = []
        while alive:
            budget = _Budget(budget_limit)
            while True:
                negative_bound, vertex = heap[0]
                if not alive >> vertex & 1 or -negative_bound != bound[vertex]:
                    heapq.heappop(heap)  # stale entry
                    continue
                target = bound[vertex]
                if target < min_size:
                    return cliques  # every remaining clique is too small to count
                if target == 1:  # only isolated vertices remain: each is its own clique, in index order
                    cliques.extend([v] for v in _members(alive))
                    return cliques
                candidates = self.rows[vertex] & alive & self.later[vertex]
                colours = self.colour_classes(candidates, target - 1, budget)
                if 1 + colours < target:
                    bound[vertex] = 1 + colours
                else:
                    rest = self.first_clique(candidates, target - 1, budget)
                    if rest is not None:
                        clique = rest | (1 << vertex)
                        break
                    bound[vertex] = target - 1
                heapq.heapreplace(heap, (-bound[vertex], vertex))
            alive &= ~clique
            cliques.append(_members(clique))
        return cliques

    def _first_search_exceeds(self, bound: list[int], min_size: int, budget_limit: int) -> bool:
        """Whether the first removal's search is sure to need more than ``budget_limit`` steps, without running it.

        The first removal cannot end before every vertex whose initial bound b exceeds both the clique number and
        min_size - 1 has been examined at that bound, and colouring its b - 1 later neighbours costs at least b - 1
        steps. A greedy colouring of the whole graph (about one examination's cost) bounds the clique number. Dense
        graphs, which would spend the whole budget on such examinations, are ruled out here at a fraction of it.
        """
        costs = sorted(bound, reverse=True)
        spent = 0
        for examined, b in enumerate(costs):
            spent += b - 1
            if spent > budget_limit:
                break
        else:
            return False
        # The vertices with the examined + 1 largest bounds cost more than the budget if all their bounds exceed the
        # clique number, that is if the graph can be coloured with fewer than costs[examined] colours.
        cap = costs[examined]
        if cap <= min_size - 1:
            return False
        return self.colour_classes((1 << self.size) - 1, cap, _Budget(self.size + 1)) < cap


def _members(mask: int) -> list[int]:
    """Indices of the set bits of ``mask``, ascending."""
    members = []
    while mask:
        lowest = mask & -mask
        members.append(lowest.bit_length() - 1)
        mask ^= lowest
    return members


def _bitset_rows(adjacency: np.ndarray) -> list[int]:
    packed = np.packbits(adjacency, axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def greedy_clique_partition(adjacency: np.ndarray, min_size: int = 1,
                            work_budget: int = DEFAULT_WORK_BUDGET) -> list[list[int]]:
    """Greedy partition of a graph into maximum cliques (lexicographically first among ties), per component.

    ``adjacency``: symmetric boolean N x N (diagonal ignored). Returns the cliques with at least ``min_size`` members,
    in removal order within each component, components in order of their smallest vertex. Raises
    WorkBudgetExceeded when one maximum-clique search needs more than ``work_budget`` steps.
    """
    adjacency = np.asarray(adjacency, dtype=bool).copy()
    np.fill_diagonal(adjacency, False)
    _, labels = connected_components(adjacency, directed=False)
    cliques = []
    for component in components_in_index_order(labels):
        cliques.extend(partition_component(adjacency[np.ix_(component, component)], component, min_size,
                                            work_budget))
    return cliques


def components_in_index_order(labels: np.ndarray, min_size: int = 1) -> list[np.ndarray]:
    """The components (ascending members) with at least ``min_size`` members, in order of their smallest member.

    Leaving out the small ones before grouping matters: at high thresholds nearly every candidate is alone.
    """
    counted = np.flatnonzero(np.bincount(labels)[labels] >= min_size)
    order = counted[np.argsort(labels[counted], kind="stable")]
    boundaries = np.flatnonzero(np.diff(labels[order])) + 1
    components = np.split(order, boundaries) if len(order) else []
    return sorted(components, key=lambda members: int(members[0]))


def partition_component(adjacency: np.ndarray, members: np.ndarray, min_size: int,
                        work_budget: int) -> list[list[int]]:
    """Cliques of one component (``adjacency`` without self loops, rows in the order of ``members``)."""
    size = len(members)
    if size < min_size:
        return []
    if size == 1 or np.count_nonzero(adjacency) == size * (size - 1):  # complete: the component is its own maximum clique
        return [members.tolist()]
    local = _Graph(_bitset_rows(adjacency)).greedy_partition(min_size, work_budget)
    return [members[clique].tolist() for clique in local]



def greedy_clique_cover(adjacency: np.ndarray, min_size: int) -> list[list[int]]:
    """A partition into cliques at O(N^2) cost, for graphs where the exact search exceeds its work budget.

    Repeatedly grow a clique from the remaining vertex of highest remaining degree, adding the common neighbour of
    highest remaining degree until none is left (ties: the lowest index), and remove it. Every part is a clique (each
    vertex added is adjacent to all before it), not necessarily a maximum one. ``adjacency``: symmetric boolean
    without self loops. Returns the cliques of at least ``min_size`` members in removal order, each ascending.
    """
    alive = np.ones(len(adjacency), dtype=bool)
    degrees = adjacency.sum(axis=1)
    cliques = []
    while alive.any():
        seed = int(np.argmax(np.where(alive, degrees, -1)))  # argmax takes the lowest index among equals
        if degrees[seed] + 1 < min_size:  # no remaining clique can reach min_size
            break
        clique, common = [seed], np.flatnonzero(adjacency[seed] & alive)
        while len(common):
            chosen = int(common[np.argmax(degrees[common])])
            clique.append(chosen)
            common = common[adjacency[chosen, common]]
        clique.sort()
        alive[clique] = False
        degrees -= adjacency[clique].sum(axis=0)
        if len(clique) >= min_size:
            cliques.append(clique)
    return cliques
