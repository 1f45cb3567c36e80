// SPDX-License-Identifier: MIT
// slither-disable-next-line pragma: OpenZeppelin's files keep their own, wider ranges
pragma solidity ^0.8.30;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {IConsentRegistry} from "./IConsentRegistry.sol";

/**
 * @dev See {IConsentRegistry}. Checks of a signed change return the revert data instead of
 * reverting, so that a batch can name the failing item's index and its reason without an external
 * self-call per item.
 */
contract ConsentRegistry is IConsentRegistry, AccessControl, EIP712 {
    bytes32 public constant OPERATOR_ROLE = keccak256("OPERATOR_ROLE");
    bytes32 public constant PARTNER_ROLE = keccak256("PARTNER_ROLE");

    bytes32 public constant CONSENT_GRANT_TYPEHASH = keccak256(
        "ConsentGrant(bytes32 subject,address partner,bytes32 purpose,uint256 attributes,uint64 validUntil,uint256 nonce,uint256 deadline)"
    );
    bytes32 public constant CONSENT_REVOKE_TYPEHASH = keccak256(
        "ConsentRevoke(bytes32 subject,address partner,bytes32 purpose,uint256 attributes,uint256 nonce,uint256 deadline)"
    );
    bytes32 public constant CONTROLLER_CHANGE_TYPEHASH =
        keccak256("ControllerChange(bytes32 subject,address newController,uint256 nonce,uint256 deadline)");
    bytes32 public constant RECOVERY_CANCEL_TYPEHASH =
        keccak256("RecoveryCancel(bytes32 subject,address newController,uint64 effectiveAt,uint256 deadline)");

    /// @dev How long a recovery waits on a new deployment: a long weekend, time for a customer to see it.
    uint64 public constant DEFAULT_RECOVERY_DELAY = 72 hours;
    /// @dev The admin cannot shorten it below an hour: the operator never changes a key at once.
    uint64 public constant MIN_RECOVERY_DELAY = 1 hours;
    uint64 private constant _MAX_RECOVERY_DELAY = 3650 days;

    /// @dev A subject's key and the nonce its next signed message must carry, in one storage slot.
    struct Controller {
        address key;
        uint96 nonce;
    }

    /// @dev A pending recovery: the key that will control the subject, and from when; one slot.
    struct Recovery {
        address newController;
        uint64 effectiveAt;
    }

    mapping(bytes32 subject => Controller) private _controllers;
    mapping(bytes32 subject => mapping(address partner => mapping(bytes32 purpose => Consent))) private _consents;
    // After the slots above, whose positions deployed tools and tests read.
    mapping(bytes32 subject => Recovery) private _recoveries;
    uint64 private _recoveryDelay = DEFAULT_RECOVERY_DELAY;

    /**
     * @dev Grants the admin role to `admin` and the operator role to `operator`.
     *
     * Requirements:
     * - neither is the zero address.
     */
    constructor(address admin, address operator) EIP712("ConsentRegistry", "1") {
        if (admin == address(0) || operator == address(0)) revert ConsentRegistryZeroAddress();
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(OPERATOR_ROLE, operator);
    }

    /// @inheritdoc IConsentRegistry
    function bindController(bytes32 subject, address controller) external onlyRole(OPERATOR_ROLE) {
        if (controller == address(0)) revert ConsentRegistryInvalidController(controller);
        address current = _controllers[subject].key;
        if (current != address(0)) revert ConsentRegistryControllerAlreadyBound(subject, current);
        _controllers[subject].key = controller;
        emit ControllerBound(subject, address(0), controller);
    }

    /// @inheritdoc IConsentRegistry
    function rebindController(
        bytes32 subject,
        address newController,
        uint256 nonce,
        uint256 deadline,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external onlyRole(OPERATOR_ROLE) {
        // slither-disable-next-line timestamp: validators can shift it by seconds; deadlines are minutes or days away
        if (block.timestamp > deadline) revert ConsentRegistryExpiredSignature(deadline);
        if (newController == address(0)) revert ConsentRegistryInvalidController(newController);
        Controller memory current = _controllers[subject];
        if (current.key == address(0)) revert ConsentRegistryUnboundSubject(subject);
        if (nonce != current.nonce) revert InvalidAccountNonce(current.key, current.nonce);
        bytes32 structHash = keccak256(abi.encode(CONTROLLER_CHANGE_TYPEHASH, subject, newController, nonce, deadline));
        address signer = ECDSA.recover(_hashTypedDataV4(structHash), v, r, s);
        if (signer != current.key) revert ConsentRegistryInvalidSigner(signer, current.key);
        _controllers[subject] = Controller(newController, current.nonce + 1);
        emit ControllerBound(subject, current.key, newController);
        address recovering = _recoveries[subject].newController;
        if (recovering != address(0)) {
            delete _recoveries[subject];
            emit ControllerRecoveryCancelled(subject, current.key, recovering);
        }
    }

    /// @inheritdoc IConsentRegistry
    function startRecovery(bytes32 subject, address newController) external onlyRole(OPERATOR_ROLE) {
        address current = _controllers[subject].key;
        if (current == address(0)) revert ConsentRegistryUnboundSubject(subject);
        if (newController == address(0) || newController == current) {
            revert ConsentRegistryInvalidController(newController);
        }
        uint64 effectiveAt = uint64(block.timestamp) + _recoveryDelay;
        Recovery memory replaced = _recoveries[subject];
        if (replaced.newController != address(0)) {
            // Announced as cancelled, so the key history shows it; and the new one waits at least as
            // long, so starting again (after the admin shortened the delay) never hurries a recovery.
            // slither-disable-next-line timestamp: both are timestamps the contract set, compared exactly
            if (replaced.effectiveAt > effectiveAt) effectiveAt = replaced.effectiveAt;
            emit ControllerRecoveryCancelled(subject, current, replaced.newController);
        }
        _recoveries[subject] = Recovery(newController, effectiveAt);
        emit ControllerRecoveryStarted(subject, current, newController, effectiveAt);
    }

    /// @inheritdoc IConsentRegistry
    function completeRecovery(bytes32 subject) external onlyRole(OPERATOR_ROLE) {
        Recovery memory recovery = _recoveries[subject];
        if (recovery.newController == address(0)) revert ConsentRegistryNoRecovery(subject);
        // slither-disable-next-line timestamp: validators can shift it by seconds; the delay is at least an hour
        if (block.timestamp < recovery.effectiveAt) {
            revert ConsentRegistryRecoveryNotDue(subject, recovery.effectiveAt);
        }
        address previous = _controllers[subject].key;
        delete _recoveries[subject];
        // The nonce stays: every signature of the old key is refused from now on by the signer check,
        // and the service's next nonce (after the changes it accepted) stays the chain's.
        _controllers[subject].key = recovery.newController;
        emit ControllerBound(subject, previous, recovery.newController);
    }

    /// @inheritdoc IConsentRegistry
    function cancelRecovery(
        bytes32 subject,
        address newController,
        uint64 effectiveAt,
        uint256 deadline,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external {
        // Anyone may send it: the current key's signature is what authorises the veto, so a customer
        // whose operator will not relay it sends it themselves.
        // slither-disable-next-line timestamp: validators can shift it by seconds; deadlines are minutes or days away
        if (block.timestamp > deadline) revert ConsentRegistryExpiredSignature(deadline);
        Recovery memory recovery = _recoveries[subject];
        bool pending = recovery.newController != address(0);
        if (!pending || recovery.newController != newController || recovery.effectiveAt != effectiveAt) {
            revert ConsentRegistryNoRecovery(subject);
        }
        address controller = _controllers[subject].key;
        bytes32 structHash =
            keccak256(abi.encode(RECOVERY_CANCEL_TYPEHASH, subject, newController, effectiveAt, deadline));
        address signer = ECDSA.recover(_hashTypedDataV4(structHash), v, r, s);
        if (signer != controller) revert ConsentRegistryInvalidSigner(signer, controller);
        delete _recoveries[subject];
        emit ControllerRecoveryCancelled(subject, controller, newController);
    }

    /// @inheritdoc IConsentRegistry
    function setRecoveryDelay(uint64 delay) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (delay < MIN_RECOVERY_DELAY || delay > _MAX_RECOVERY_DELAY) {
            revert ConsentRegistryInvalidRecoveryDelay(delay, MIN_RECOVERY_DELAY);
        }
        uint64 previous = _recoveryDelay;
        _recoveryDelay = delay;
        emit RecoveryDelaySet(previous, delay);
    }

    /// @inheritdoc IConsentRegistry
    function recoveryOf(bytes32 subject) external view returns (address newController, uint64 effectiveAt) {
        Recovery memory recovery = _recoveries[subject];
        return (recovery.newController, recovery.effectiveAt);
    }

    /// @inheritdoc IConsentRegistry
    function recoveryDelay() external view returns (uint64) {
        return _recoveryDelay;
    }

    /// @inheritdoc IConsentRegistry
    function applyChange(SignedChange calldata change) external onlyRole(OPERATOR_ROLE) {
        bytes memory failure = _apply(change);
        if (failure.length != 0) {
            // slither-disable-next-line assembly: re-throws the check's revert data as is (no Solidity for raw bytes)
            assembly ("memory-safe") {
                revert(add(failure, 0x20), mload(failure))
            }
        }
    }

    /// @inheritdoc IConsentRegistry
    function applyBatch(SignedChange[] calldata changes) external onlyRole(OPERATOR_ROLE) {
        for (uint256 i = 0; i < changes.length; ++i) {
            bytes memory failure = _apply(changes[i]);
            if (failure.length != 0) revert ConsentRegistryBatchItemFailed(i, failure);
        }
    }

    /// @inheritdoc IConsentRegistry
    function controllerOf(bytes32 subject) external view returns (address) {
        return _controllers[subject].key;
    }

    /// @inheritdoc IConsentRegistry
    function nonceOf(bytes32 subject) external view returns (uint256) {
        return _controllers[subject].nonce;
    }

    /// @inheritdoc IConsentRegistry
    function consentOf(bytes32 subject, address partner, bytes32 purpose) external view returns (Consent memory) {
        return _consents[subject][partner][purpose];
    }

    /// @inheritdoc IConsentRegistry
    function isPermitted(bytes32 subject, address partner, bytes32 purpose, uint256 attributes)
        external
        view
        returns (bool)
    {
        if (attributes == 0 || !hasRole(PARTNER_ROLE, partner)) return false;
        Consent storage consent = _consents[subject][partner][purpose];
        // slither-disable-next-line timestamp: validators can shift it by seconds; validity is a date, not a second
        if (consent.validUntil != 0 && consent.validUntil <= block.timestamp) return false;
        return consent.attributes & attributes == attributes;
    }

    /// @dev The EIP-712 domain separator of this contract on this chain.
    // slither-disable-next-line naming-convention: the name EIP-2612 gives it, which wallets call
    function DOMAIN_SEPARATOR() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    /**
     * @dev Checks and applies one change. Returns empty bytes on success, otherwise the revert data
     * of the first failed check (and changes nothing).
     */
    function _apply(SignedChange calldata c) private returns (bytes memory) {
        // slither-disable-next-line timestamp: validators can shift it by seconds; deadlines and validity are coarser
        if (block.timestamp > c.deadline) {
            return abi.encodeWithSelector(ConsentRegistryExpiredSignature.selector, c.deadline);
        }
        if (c.attributes == 0) return abi.encodeWithSelector(ConsentRegistryEmptyAttributes.selector);
        Controller storage slot = _controllers[c.subject];
        (address controller, uint96 expectedNonce) = (slot.key, slot.nonce);
        if (controller == address(0)) {
            return abi.encodeWithSelector(ConsentRegistryUnboundSubject.selector, c.subject);
        }
        // Nonces only move forward: a change applies if its nonce is not below the subject's next one,
        // and moves it past itself. A change the customer signed later therefore takes effect even when
        // an earlier one failed here (an expired grant must not keep a later revocation off the chain),
        // and nothing applies twice or before a change it was signed after. Skipping a nonce drops what
        // carried it, which the relayer could do anyway by never sending it. The cap keeps `nonce + 1`
        // within the slot's 96 bits (a wrapped nonce would let old signatures apply again).
        if (c.nonce < expectedNonce || c.nonce >= type(uint96).max) {
            return abi.encodeWithSelector(InvalidAccountNonce.selector, controller, expectedNonce);
        }
        address signer = _signer(c);
        if (signer != controller) {
            return abi.encodeWithSelector(ConsentRegistryInvalidSigner.selector, signer, controller);
        }
        if (c.kind == ChangeKind.Grant) {
            if (!hasRole(PARTNER_ROLE, c.partner)) {
                return abi.encodeWithSelector(ConsentRegistryUnknownPartner.selector, c.partner);
            }
            if (c.attributes > type(uint192).max) {
                return abi.encodeWithSelector(ConsentRegistryAttributesOutOfRange.selector, c.attributes);
            }
            if (c.validUntil != 0 && c.validUntil <= block.timestamp) {
                return abi.encodeWithSelector(ConsentRegistryInvalidValidity.selector, c.validUntil);
            }
            slot.nonce = uint96(c.nonce) + 1;
            _grant(c);
        } else {
            if (c.validUntil != 0) {
                return abi.encodeWithSelector(ConsentRegistryInvalidValidity.selector, c.validUntil);
            }
            slot.nonce = uint96(c.nonce) + 1;
            _revoke(c);
        }
        return "";
    }

    /// @dev The signer of `c`'s EIP-712 message, or zero for a malformed signature.
    function _signer(SignedChange calldata c) private view returns (address) {
        bytes32 structHash = c.kind == ChangeKind.Grant
            ? keccak256(
                abi.encode(
                    CONSENT_GRANT_TYPEHASH, c.subject, c.partner, c.purpose, c.attributes, c.validUntil, c.nonce, c.deadline
                )
            )
            : keccak256(
                abi.encode(CONSENT_REVOKE_TYPEHASH, c.subject, c.partner, c.purpose, c.attributes, c.nonce, c.deadline)
            );
        // slither-disable-next-line unused-return: the third value only details the failure `err` reports
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(_hashTypedDataV4(structHash), c.v, c.r, c.s);
        return err == ECDSA.RecoverError.NoError ? signer : address(0);
    }

    /// @dev `c.attributes` fits in 192 bits (checked by {_apply}).
    function _grant(SignedChange calldata c) private {
        Consent storage consent = _consents[c.subject][c.partner][c.purpose];
        // slither-disable-next-line timestamp: validators can shift it by seconds; validity is a date, not a second
        bool lapsed = consent.validUntil != 0 && consent.validUntil <= block.timestamp;
        uint192 attributes = (lapsed ? 0 : consent.attributes) | uint192(c.attributes);
        consent.attributes = attributes;
        consent.validUntil = c.validUntil;
        emit ConsentGranted(c.subject, c.partner, c.purpose, c.attributes, attributes, c.validUntil, c.nonce);
    }

    /// @dev Bits above 192 were never granted; revoking them changes nothing (and is recorded).
    function _revoke(SignedChange calldata c) private {
        Consent storage consent = _consents[c.subject][c.partner][c.purpose];
        uint192 attributes = consent.attributes & ~uint192(c.attributes);
        consent.attributes = attributes;
        emit ConsentRevoked(c.subject, c.partner, c.purpose, c.attributes, attributes, c.nonce);
    }
}
