// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

/// @dev The two ERC-20 calls this contract makes.
interface IERC20Transfers {
    function transfer(address to, uint256 amount) external returns (bool);
    function transferFrom(address from, address to, uint256 amount) external returns (bool);
}

/// @title Ludus daily settlement.
/// @notice Games keep escrow here in one ERC-20 token. Between settlements the operator
/// anchors the Merkle root of every registry block (batched: one transaction carries many
/// consecutive blocks, and stores one root over them). Once a day the operator posts an
/// epoch in a single transaction: the registry blocks it settles (all anchored before),
/// the charge of every game that used the network (taken from its escrow) and the Merkle
/// root of every node's payout. Each node then claims its payout with a proof. Gas per
/// post grows with the number of games charged, gas per anchor with the number of blocks
/// anchored, never either with the number of tasks. Charges not paid out to nodes are
/// the network's fee.
contract Settlement {
    struct Epoch {
        bytes32 payoutRoot;
        uint128 payoutTotal;
        uint128 claimedTotal;
        uint128 chargeTotal;
        uint64 postedAt;
        /// The last registry block the epoch settles (its first is the previous epoch's
        /// last + 1).
        uint64 lastBlock;
    }

    /// @dev Registry blocks `firstBlock..=lastBlock`, anchored in one transaction, under
    /// one root over their `blockLeaf`s.
    struct Anchor {
        bytes32 root;
        uint64 firstBlock;
        uint64 lastBlock;
        uint64 anchoredAt;
    }

    struct Withdrawal {
        uint256 amount;
        uint64 availableAt;
    }

    IERC20Transfers public immutable token;
    /// @notice Seconds between asking for escrow back and getting it, so a game cannot
    /// withdraw in the window between the operator reading its escrow and charging it.
    uint64 public immutable withdrawalDelay;
    address public operator;
    address public treasury;
    /// @notice The last epoch posted; epochs are posted in order, each exactly once.
    uint64 public lastEpoch;
    /// @notice Charges not paid out to nodes, for the treasury to collect.
    uint256 public fees;
    /// @notice The last registry block anchored; blocks are anchored in order, each once.
    uint64 public lastAnchoredBlock;
    /// @notice Anchors made so far; anchor ids run from 1.
    uint64 public anchorCount;
    /// @notice The last registry block settled by an epoch.
    uint64 public lastSettledBlock;

    mapping(uint64 => Epoch) public epochs;
    mapping(uint64 => Anchor) public anchors;
    mapping(uint64 => mapping(address => bool)) public claimed;
    mapping(address => uint256) public escrowOf;
    mapping(address => Withdrawal) public pendingWithdrawal;

    event Deposited(address indexed game, address indexed from, uint256 amount);
    event WithdrawalRequested(address indexed game, uint256 amount, uint64 availableAt);
    event Withdrawn(address indexed game, uint256 amount);
    event GameCharged(uint64 indexed epoch, address indexed game, uint256 amount);
    event EpochPosted(uint64 indexed epoch, bytes32 payoutRoot, uint256 payoutTotal, uint256 chargeTotal, uint256 games);
    event EpochBlocks(uint64 indexed epoch, uint64 firstBlock, uint64 lastBlock);
    event BlocksAnchored(uint64 indexed anchor, uint64 firstBlock, uint64 lastBlock, bytes32 root);
    event Claimed(uint64 indexed epoch, address indexed node, uint256 amount);
    event OperatorChanged(address indexed previous, address indexed next);
    event TreasuryChanged(address indexed previous, address indexed next);
    event FeesCollected(address indexed to, uint256 amount);

    error NotOperator(address caller);
    error NotTreasury(address caller);
    error ZeroAddress();
    error ZeroAmount();
    error EpochOutOfOrder(uint64 expected, uint64 given);
    error LengthMismatch(uint256 games, uint256 charges);
    error EscrowShort(address game, uint256 escrow, uint256 charge);
    error PayoutExceedsCharges(uint256 payoutTotal, uint256 chargeTotal);
    error UnknownEpoch(uint64 epoch);
    error AlreadyClaimed(uint64 epoch, address node);
    error InvalidProof(uint64 epoch, address node, uint256 amount);
    error ClaimExceedsEpoch(uint64 epoch);
    error NothingToWithdraw(address game);
    error WithdrawalNotReady(uint64 availableAt);
    error TransferFailed();
    error NoBlocks();
    error AnchorOutOfOrder(uint64 expected, uint64 given);
    error BlockRangeOutOfOrder(uint64 expectedFirst, uint64 givenFirst);
    error BadBlockRange(uint64 firstBlock, uint64 lastBlock);
    error BlocksNotAnchored(uint64 lastBlock, uint64 lastAnchored);

    modifier onlyOperator() {
        if (msg.sender != operator) revert NotOperator(msg.sender);
        _;
    }

    constructor(IERC20Transfers token_, address operator_, address treasury_, uint64 withdrawalDelay_) {
        if (address(token_).code.length == 0 || operator_ == address(0) || treasury_ == address(0)) {
            revert ZeroAddress();
        }
        token = token_;
        operator = operator_;
        treasury = treasury_;
        withdrawalDelay = withdrawalDelay_;
        emit OperatorChanged(address(0), operator_);
        emit TreasuryChanged(address(0), treasury_);
    }

    // ----- Escrow -----------------------------------------------------------------------

    /// @notice Adds `amount` to the escrow of `game` (anyone may top a game up).
    function depositFor(address game, uint256 amount) public {
        if (game == address(0)) revert ZeroAddress();
        if (amount == 0) revert ZeroAmount();
        escrowOf[game] += amount;
        _pull(msg.sender, amount);
        emit Deposited(game, msg.sender, amount);
    }

    /// @notice Adds `amount` to the caller's own escrow.
    function deposit(uint256 amount) external {
        depositFor(msg.sender, amount);
    }

    /// @notice Asks for `amount` of the caller's escrow back after `withdrawalDelay`;
    /// replaces any earlier request. Until paid out it can still be charged.
    function requestWithdrawal(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        uint64 availableAt = uint64(block.timestamp) + withdrawalDelay;
        pendingWithdrawal[msg.sender] = Withdrawal(amount, availableAt);
        emit WithdrawalRequested(msg.sender, amount, availableAt);
    }

    /// @notice Pays out the caller's matured request (capped at what escrow is left).
    function withdraw() external {
        Withdrawal memory request = pendingWithdrawal[msg.sender];
        if (request.amount == 0) revert NothingToWithdraw(msg.sender);
        if (block.timestamp < request.availableAt) revert WithdrawalNotReady(request.availableAt);
        uint256 escrow = escrowOf[msg.sender];
        uint256 amount = request.amount < escrow ? request.amount : escrow;
        delete pendingWithdrawal[msg.sender];
        escrowOf[msg.sender] = escrow - amount;
        if (amount > 0) _push(msg.sender, amount);
        emit Withdrawn(msg.sender, amount);
    }

    /// @notice Escrow that settlement can count on: the balance less any pending request.
    function availableEscrow(address game) public view returns (uint256) {
        uint256 escrow = escrowOf[game];
        uint256 requested = pendingWithdrawal[game].amount;
        return requested >= escrow ? 0 : escrow - requested;
    }

    /// @notice `availableEscrow` for many games in one call.
    function availableEscrows(address[] calldata games) external view returns (uint256[] memory amounts) {
        amounts = new uint256[](games.length);
        for (uint256 i; i < games.length; ++i) {
            amounts[i] = availableEscrow(games[i]);
        }
    }

    // ----- Block anchors ----------------------------------------------------------------

    /// @notice The leaf of registry block `number` with Merkle root `root` in an anchor's
    /// tree (hashed twice, so no inner node of the tree can pass for a leaf).
    function blockLeaf(uint64 number, bytes32 root) public pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(number, root))));
    }

    /// @notice Anchors the roots of registry blocks `firstBlock`, `firstBlock + 1`, …
    /// (the block after `lastAnchoredBlock` first). Stores one root over their leaves,
    /// built as the ledger builds it: sorted pairs, an odd last node carried up.
    function anchorBlocks(uint64 firstBlock, bytes32[] calldata roots) external onlyOperator {
        uint256 count = roots.length;
        if (count == 0) revert NoBlocks();
        if (firstBlock != lastAnchoredBlock + 1) revert AnchorOutOfOrder(lastAnchoredBlock + 1, firstBlock);
        bytes32[] memory level = new bytes32[](count);
        for (uint256 i; i < count; ++i) {
            level[i] = blockLeaf(firstBlock + uint64(i), roots[i]);
        }
        while (count > 1) {
            for (uint256 i; i < count / 2; ++i) {
                level[i] = _hashPair(level[2 * i], level[2 * i + 1]);
            }
            if (count % 2 == 1) level[count / 2] = level[count - 1];
            count = (count + 1) / 2;
        }
        uint64 lastBlock = firstBlock + uint64(roots.length) - 1;
        uint64 id = anchorCount + 1;
        anchorCount = id;
        lastAnchoredBlock = lastBlock;
        anchors[id] = Anchor(level[0], firstBlock, lastBlock, uint64(block.timestamp));
        emit BlocksAnchored(id, firstBlock, lastBlock, level[0]);
    }

    /// @notice Whether anchor `anchorId` holds registry block `number` with root `root`,
    /// by `proof` (the block leaf's sibling path to the anchor's root).
    function blockAnchored(uint64 anchorId, uint64 number, bytes32 root, bytes32[] calldata proof)
        external
        view
        returns (bool)
    {
        Anchor storage anchor = anchors[anchorId];
        if (anchor.anchoredAt == 0 || number < anchor.firstBlock || number > anchor.lastBlock) return false;
        return _verify(proof, anchor.root, blockLeaf(number, root));
    }

    // ----- Epochs -----------------------------------------------------------------------

    /// @notice Posts epoch `epoch` (the one after `lastEpoch`), settling registry blocks
    /// `firstBlock..=lastBlock` (the ones after `lastSettledBlock`, all anchored; an empty
    /// range when `lastBlock + 1 == firstBlock`): charges each game from its escrow and
    /// records the payout root. Reverts as a whole if any game's escrow is short, so a
    /// post never half happens.
    function postEpoch(
        uint64 epoch,
        uint64 firstBlock,
        uint64 lastBlock,
        bytes32 payoutRoot,
        uint256 payoutTotal,
        address[] calldata games,
        uint256[] calldata charges
    ) external onlyOperator {
        if (epoch != lastEpoch + 1) revert EpochOutOfOrder(lastEpoch + 1, epoch);
        if (firstBlock != lastSettledBlock + 1) revert BlockRangeOutOfOrder(lastSettledBlock + 1, firstBlock);
        if (uint256(lastBlock) + 1 < firstBlock) revert BadBlockRange(firstBlock, lastBlock);
        if (lastBlock > lastAnchoredBlock) revert BlocksNotAnchored(lastBlock, lastAnchoredBlock);
        if (games.length != charges.length) revert LengthMismatch(games.length, charges.length);
        uint256 chargeTotal;
        for (uint256 i; i < games.length; ++i) {
            address game = games[i];
            uint256 charge = charges[i];
            uint256 escrow = escrowOf[game];
            if (escrow < charge) revert EscrowShort(game, escrow, charge);
            escrowOf[game] = escrow - charge;
            chargeTotal += charge;
            emit GameCharged(epoch, game, charge);
        }
        if (payoutTotal > chargeTotal) revert PayoutExceedsCharges(payoutTotal, chargeTotal);
        lastEpoch = epoch;
        lastSettledBlock = lastBlock;
        fees += chargeTotal - payoutTotal;
        epochs[epoch] =
            Epoch(payoutRoot, uint128(payoutTotal), 0, uint128(chargeTotal), uint64(block.timestamp), lastBlock);
        emit EpochPosted(epoch, payoutRoot, payoutTotal, chargeTotal, games.length);
        emit EpochBlocks(epoch, firstBlock, lastBlock);
    }

    /// @notice The leaf of `node`'s payout in an epoch's tree (hashed twice, so no inner
    /// node of the tree can pass for a leaf).
    function payoutLeaf(address node, uint256 amount) public pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(node, amount))));
    }

    /// @notice Pays `node` its payout for `epoch`. Anyone may submit it (a node without
    /// gas can have it relayed); the tokens always go to `node`.
    function claim(uint64 epoch, address node, uint256 amount, bytes32[] calldata proof) public {
        Epoch storage posted = epochs[epoch];
        if (posted.postedAt == 0) revert UnknownEpoch(epoch);
        if (claimed[epoch][node]) revert AlreadyClaimed(epoch, node);
        if (!_verify(proof, posted.payoutRoot, payoutLeaf(node, amount))) revert InvalidProof(epoch, node, amount);
        uint256 claimedTotal = uint256(posted.claimedTotal) + amount;
        if (claimedTotal > posted.payoutTotal) revert ClaimExceedsEpoch(epoch);
        claimed[epoch][node] = true;
        posted.claimedTotal = uint128(claimedTotal);
        _push(node, amount);
        emit Claimed(epoch, node, amount);
    }

    /// @notice Several claims of one node in one transaction.
    function claimMany(
        address node,
        uint64[] calldata epochList,
        uint256[] calldata amounts,
        bytes32[][] calldata proofs
    ) external {
        if (epochList.length != amounts.length || epochList.length != proofs.length) {
            revert LengthMismatch(epochList.length, amounts.length);
        }
        for (uint256 i; i < epochList.length; ++i) {
            claim(epochList[i], node, amounts[i], proofs[i]);
        }
    }

    // ----- Administration ---------------------------------------------------------------

    function setOperator(address next) external onlyOperator {
        if (next == address(0)) revert ZeroAddress();
        emit OperatorChanged(operator, next);
        operator = next;
    }

    function setTreasury(address next) external {
        if (msg.sender != treasury) revert NotTreasury(msg.sender);
        if (next == address(0)) revert ZeroAddress();
        emit TreasuryChanged(treasury, next);
        treasury = next;
    }

    /// @notice Sends the accumulated fees to the treasury.
    function collectFees() external {
        uint256 amount = fees;
        if (amount == 0) revert ZeroAmount();
        fees = 0;
        _push(treasury, amount);
        emit FeesCollected(treasury, amount);
    }

    // ----- Internals --------------------------------------------------------------------

    /// @dev Sorted-pair keccak Merkle proof, as the ledger builds it.
    function _verify(bytes32[] calldata proof, bytes32 root, bytes32 leaf) private pure returns (bool) {
        bytes32 hash = leaf;
        for (uint256 i; i < proof.length; ++i) {
            hash = _hashPair(hash, proof[i]);
        }
        return hash == root;
    }

    function _hashPair(bytes32 a, bytes32 b) private pure returns (bytes32) {
        return a < b ? keccak256(abi.encode(a, b)) : keccak256(abi.encode(b, a));
    }

    function _pull(address from, uint256 amount) private {
        _call(abi.encodeCall(IERC20Transfers.transferFrom, (from, address(this), amount)));
    }

    function _push(address to, uint256 amount) private {
        _call(abi.encodeCall(IERC20Transfers.transfer, (to, amount)));
    }

    /// @dev Accepts tokens that return `true` and tokens that return nothing.
    function _call(bytes memory data) private {
        (bool ok, bytes memory result) = address(token).call(data);
        if (!ok || (result.length != 0 && !abi.decode(result, (bool)))) revert TransferFailed();
    }
}
