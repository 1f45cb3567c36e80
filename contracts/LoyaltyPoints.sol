// SPDX-License-Identifier: MIT
// slither-disable-next-line pragma: OpenZeppelin's files keep their own, wider ranges
pragma solidity ^0.8.30;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IAccessControl} from "@openzeppelin/contracts/access/IAccessControl.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {NoncesKeyed} from "@openzeppelin/contracts/utils/NoncesKeyed.sol";
import {IConsentRegistry} from "./IConsentRegistry.sol";
import {ILoyaltyPoints} from "./ILoyaltyPoints.sol";

/**
 * @dev See {ILoyaltyPoints}. Subjects, their controllers and the partner role come from the
 * consent registry, so there is one place that says who a customer's key is and who is a partner.
 */
contract LoyaltyPoints is ILoyaltyPoints, AccessControl, EIP712, NoncesKeyed {
    bytes32 public constant ISSUER_ROLE = keccak256("ISSUER_ROLE");
    bytes32 public constant RELAYER_ROLE = keccak256("RELAYER_ROLE");
    bytes32 public constant PARTNER_ROLE = keccak256("PARTNER_ROLE");

    bytes32 public constant REDEMPTION_TYPEHASH = keccak256(
        "Redemption(bytes32 subject,address partner,uint256 amount,bytes32 redemptionId,uint256 nonce,uint256 deadline)"
    );

    /// @dev Per subject: points in lots not yet swept, the lot list's ends, and the last lot id given.
    struct Account {
        uint128 stored;
        uint64 head;
        uint64 tail;
        uint64 lastLot;
    }

    IConsentRegistry private immutable _registry;
    mapping(bytes32 subject => Account) private _accounts;
    mapping(bytes32 subject => mapping(uint64 lotId => Lot)) private _lots;
    mapping(bytes32 issuanceId => bool) private _issued;
    mapping(bytes32 redemptionId => bool) private _redeemed;
    uint256 private _totalIssued;
    uint256 private _totalRedeemed;
    uint256 private _totalExpired;

    /**
     * @dev Grants the admin role to `admin` and the issuer and relayer roles to `operator`.
     *
     * Requirements:
     * - none of the addresses is zero.
     */
    constructor(address admin, address operator, IConsentRegistry registry_) EIP712("LoyaltyPoints", "1") {
        if (admin == address(0) || operator == address(0) || address(registry_) == address(0)) {
            revert LoyaltyPointsZeroAddress();
        }
        _registry = registry_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(ISSUER_ROLE, operator);
        _grantRole(RELAYER_ROLE, operator);
    }

    /// @inheritdoc ILoyaltyPoints
    function issue(Issuance calldata issuance) external onlyRole(ISSUER_ROLE) {
        _revertWith(_issue(issuance));
    }

    /// @inheritdoc ILoyaltyPoints
    function issueBatch(Issuance[] calldata issuances) external onlyRole(ISSUER_ROLE) {
        for (uint256 i = 0; i < issuances.length; ++i) {
            bytes memory failure = _issue(issuances[i]);
            if (failure.length != 0) emit IssuanceRejected(issuances[i].subject, issuances[i].issuanceId, failure);
        }
    }

    /// @inheritdoc ILoyaltyPoints
    function redeem(SignedRedemption calldata redemption) external {
        if (msg.sender != redemption.partner && !hasRole(RELAYER_ROLE, msg.sender)) {
            revert LoyaltyPointsUnauthorizedSubmitter(msg.sender, redemption.partner);
        }
        _revertWith(_redeem(redemption));
    }

    /// @inheritdoc ILoyaltyPoints
    function redeemBatch(SignedRedemption[] calldata redemptions) external onlyRole(RELAYER_ROLE) {
        for (uint256 i = 0; i < redemptions.length; ++i) {
            SignedRedemption calldata r = redemptions[i];
            bytes memory failure = _redeem(r);
            if (failure.length != 0) emit RedemptionRejected(r.subject, r.partner, r.redemptionId, failure);
        }
    }

    /// @inheritdoc ILoyaltyPoints
    function sweepExpired(bytes32 subject, uint256 maxLots) external {
        _sweep(subject, maxLots);
    }

    /// @inheritdoc ILoyaltyPoints
    function balanceOf(bytes32 subject) external view returns (uint256) {
        Account storage account = _accounts[subject];
        uint256 balance = account.stored;
        // Expired lots not yet swept are at the head of the list: only those are visited.
        for (uint64 id = account.head; id != 0; id = _lots[subject][id].next) {
            Lot storage lot = _lots[subject][id];
            // slither-disable-next-line timestamp: validators can shift it by seconds; expiry is a date, not a second
            if (lot.expiresAt > block.timestamp) break;
            balance -= lot.remaining;
        }
        return balance;
    }

    /// @inheritdoc ILoyaltyPoints
    function lotsOf(bytes32 subject) external view returns (uint64[] memory ids, Lot[] memory lots) {
        uint256 count = 0;
        for (uint64 id = _accounts[subject].head; id != 0; id = _lots[subject][id].next) ++count;
        ids = new uint64[](count);
        lots = new Lot[](count);
        uint256 i = 0;
        for (uint64 id = _accounts[subject].head; id != 0; id = _lots[subject][id].next) {
            ids[i] = id;
            lots[i++] = _lots[subject][id];
        }
    }

    /// @inheritdoc ILoyaltyPoints
    function totals() external view returns (uint256 issued, uint256 redeemed, uint256 expired) {
        return (_totalIssued, _totalRedeemed, _totalExpired);
    }

    /// @inheritdoc ILoyaltyPoints
    function redemptionUsed(bytes32 redemptionId) external view returns (bool) {
        return _redeemed[redemptionId];
    }

    /// @dev The consent registry that names subjects' controllers and the partners.
    function registry() external view returns (IConsentRegistry) {
        return _registry;
    }

    /// @dev The EIP-712 domain separator of this contract on this chain.
    // slither-disable-next-line naming-convention: the name EIP-2612 gives it, which wallets call
    function DOMAIN_SEPARATOR() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    /// @dev Checks and applies one issuance; returns empty bytes, or the revert data of the failed check.
    function _issue(Issuance calldata issuance) private returns (bytes memory) {
        if (issuance.amount == 0) return abi.encodeWithSelector(LoyaltyPointsInvalidAmount.selector, 0);
        // slither-disable-next-line timestamp: validators can shift it by seconds; expiry is a date, not a second
        if (issuance.expiresAt <= block.timestamp) {
            return abi.encodeWithSelector(LoyaltyPointsInvalidExpiry.selector, issuance.expiresAt);
        }
        if (_issued[issuance.issuanceId]) {
            return abi.encodeWithSelector(LoyaltyPointsIssuanceUsed.selector, issuance.issuanceId);
        }
        _issued[issuance.issuanceId] = true;
        _sweep(issuance.subject, type(uint256).max);
        uint64 lotId = _insert(issuance.subject, issuance.amount, issuance.expiresAt);
        _accounts[issuance.subject].stored += issuance.amount;
        // slither-disable-next-line costly-loop: the slot is warm after the first pass: about 200 gas a pass
        _totalIssued += issuance.amount;
        emit PointsIssued(issuance.subject, issuance.issuanceId, lotId, issuance.amount, issuance.expiresAt);
        return "";
    }

    /**
     * @dev Puts `amount` into the subject's lot list, kept ordered by expiry: into the lot with the same
     * expiry if there is one, else a new lot. Lots are usually issued with ever later expiries, which
     * appends at the tail; an earlier expiry walks the live lots from the head.
     */
    function _insert(bytes32 subject, uint128 amount, uint64 expiresAt) private returns (uint64) {
        Account storage account = _accounts[subject];
        mapping(uint64 => Lot) storage lots = _lots[subject];
        uint64 tail = account.tail;
        if (tail != 0 && lots[tail].expiresAt == expiresAt) {
            lots[tail].remaining += amount;
            return tail;
        }
        uint64 id = ++account.lastLot;
        lots[id].remaining = amount;
        lots[id].expiresAt = expiresAt;
        if (tail == 0) {
            account.head = id;
            account.tail = id;
        } else if (lots[tail].expiresAt < expiresAt) {
            lots[tail].next = id;
            account.tail = id;
        } else {
            uint64 previous = 0;
            uint64 current = account.head;
            while (lots[current].expiresAt < expiresAt) {
                previous = current;
                current = lots[current].next;
            }
            if (lots[current].expiresAt == expiresAt) {
                delete lots[id];
                --account.lastLot;
                lots[current].remaining += amount;
                return current;
            }
            lots[id].next = current;
            if (previous == 0) account.head = id;
            else lots[previous].next = id;
        }
        return id;
    }

    /// @dev Checks and applies one redemption; returns empty bytes, or the revert data of the failed check.
    function _redeem(SignedRedemption calldata r) private returns (bytes memory) {
        // slither-disable-next-line timestamp: validators can shift it by seconds; deadlines are minutes or days away
        if (block.timestamp > r.deadline) return abi.encodeWithSelector(LoyaltyPointsExpiredSignature.selector, r.deadline);
        if (r.amount == 0 || r.amount > type(uint128).max) {
            return abi.encodeWithSelector(LoyaltyPointsInvalidAmount.selector, r.amount);
        }
        if (_redeemed[r.redemptionId]) return abi.encodeWithSelector(LoyaltyPointsRedemptionUsed.selector, r.redemptionId);
        // slither-disable-next-line calls-loop: the immutable registry is our ConsentRegistry; its views never revert
        if (!IAccessControl(address(_registry)).hasRole(PARTNER_ROLE, r.partner)) {
            return abi.encodeWithSelector(LoyaltyPointsUnknownPartner.selector, r.partner);
        }
        // slither-disable-next-line calls-loop: the immutable registry is our ConsentRegistry; its views never revert
        address controller = _registry.controllerOf(r.subject);
        if (controller == address(0)) return abi.encodeWithSelector(LoyaltyPointsUnboundSubject.selector, r.subject);
        uint192 key = uint192(uint160(r.partner));
        uint256 expectedNonce = nonces(controller, key);
        if (r.nonce != expectedNonce) return abi.encodeWithSelector(InvalidAccountNonce.selector, controller, expectedNonce);
        bytes32 structHash =
            keccak256(abi.encode(REDEMPTION_TYPEHASH, r.subject, r.partner, r.amount, r.redemptionId, r.nonce, r.deadline));
        // slither-disable-next-line unused-return: the third value only details the failure `err` reports
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(_hashTypedDataV4(structHash), r.v, r.r, r.s);
        if (err != ECDSA.RecoverError.NoError) signer = address(0);
        if (signer != controller) return abi.encodeWithSelector(LoyaltyPointsInvalidSigner.selector, signer, controller);
        _sweep(r.subject, type(uint256).max);
        Account storage account = _accounts[r.subject];
        if (account.stored < r.amount) {
            return abi.encodeWithSelector(LoyaltyPointsInsufficientBalance.selector, r.subject, account.stored, r.amount);
        }
        _useNonce(controller, key);
        _redeemed[r.redemptionId] = true;
        _consume(r.subject, uint128(r.amount));
        // slither-disable-next-line costly-loop: the slot is warm after the first pass: about 200 gas a pass
        _totalRedeemed += r.amount;
        emit PointsRedeemed(r.subject, r.partner, r.redemptionId, r.amount, account.stored, r.nonce);
        return "";
    }

    /// @dev Takes `amount` from the soonest-expiring lots (all unexpired: the caller swept first).
    function _consume(bytes32 subject, uint128 amount) private {
        Account storage account = _accounts[subject];
        mapping(uint64 => Lot) storage lots = _lots[subject];
        account.stored -= amount;
        uint64 id = account.head;
        while (amount != 0) {
            Lot storage lot = lots[id];
            if (lot.remaining > amount) {
                lot.remaining -= amount;
                break;
            }
            amount -= lot.remaining;
            uint64 next = lot.next;
            delete lots[id];
            id = next;
        }
        account.head = id;
        if (id == 0) account.tail = 0;
    }

    /// @dev Removes up to `maxLots` expired lots from the head of the subject's list.
    function _sweep(bytes32 subject, uint256 maxLots) private {
        Account storage account = _accounts[subject];
        mapping(uint64 => Lot) storage lots = _lots[subject];
        uint64 id = account.head;
        uint256 swept = 0;
        // slither-disable-next-line timestamp: validators can shift it by seconds; expiry is a date, not a second
        while (id != 0 && swept < maxLots && lots[id].expiresAt <= block.timestamp) {
            Lot storage lot = lots[id];
            uint128 amount = lot.remaining;
            uint64 next = lot.next;
            account.stored -= amount;
            // slither-disable-next-line costly-loop: the slot is warm after the first pass: about 200 gas a pass
            _totalExpired += amount;
            emit PointsExpired(subject, id, amount);
            delete lots[id];
            id = next;
            ++swept;
        }
        if (swept != 0) {
            account.head = id;
            if (id == 0) account.tail = 0;
        }
    }

    function _revertWith(bytes memory failure) private pure {
        if (failure.length != 0) {
            // slither-disable-next-line assembly: re-throws the check's revert data as is (no Solidity for raw bytes)
            assembly ("memory-safe") {
                revert(add(failure, 0x20), mload(failure))
            }
        }
    }
}
